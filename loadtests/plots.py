"""The report's plots, each a function of a recorded run returning an SVG document (or None when the run has
nothing to show, and the report says why). Drawn on matplotlib Figures directly, not pyplot: no global
state, no display needed."""
from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure

from loadtests.metrics import occupancy_series
from loadtests.records import Record, RunData
from loadtests.stats import Summary, served_model

SIZE = (7.5, 3.6)   # inches: two plots side by side fit a laptop screen


def _svg(fig: Figure) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    return buf.getvalue()


def _measured(run: RunData) -> list[Record]:
    return [r for r in run.records if not r.warmup]


def latency_cdf(run: RunData) -> str | None:
    """The distribution of OK latencies, one curve per served model."""
    by_model: dict[str, list[float]] = {}
    for r in _measured(run):
        if r.ok:
            by_model.setdefault(served_model(r), []).append(r.latency_s * 1000)
    if not by_model:
        return None
    fig = Figure(figsize=SIZE)
    ax = fig.add_subplot()
    for model, latencies in sorted(by_model.items()):
        x = np.sort(latencies)
        ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post", label=f"{model} ({len(x)})")
    ax.set(xlabel="latency from intended send (ms)", ylabel="fraction of requests", ylim=(0, 1.02),
           title="Latency CDF (OK answers)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _svg(fig)


def load_curves(summary: Summary) -> str | None:
    """Latency percentiles, and throughput / goodput, against the offered load of each stage."""
    stages = [g for g in summary.by_stage if g.requests]
    if not stages:
        return None
    offered = [g.offered_rps for g in stages]
    fig = Figure(figsize=(SIZE[0] * 1.4, SIZE[1]))
    ax_lat, ax_tp = fig.subplots(1, 2)
    for name in ("p50", "p90", "p99"):
        values = [np.nan if getattr(g, f"{name}_s") is None else getattr(g, f"{name}_s") * 1000 for g in stages]
        ax_lat.plot(offered, values, marker="o", label=name)
    ax_lat.set(xlabel="offered load (req/s)", ylabel="latency (ms)", title="Latency vs offered load")
    ax_tp.plot(offered, [g.throughput_rps for g in stages], marker="o", label="throughput (OK)")
    ax_tp.plot(offered, [g.goodput_rps for g in stages], marker="s", ls="--", label="goodput (OK within SLO)")
    top = max(offered)
    ax_tp.plot([0, top], [0, top], ls="--", color="grey", lw=1, label="offered")
    ax_tp.set(xlabel="offered load (req/s)", ylabel="req/s", title="Throughput vs offered load")
    for ax in (ax_lat, ax_tp):
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _svg(fig)


def _stage_bars(summary: Summary, series: dict[str, list[float]], ylabel: str, title: str) -> str:
    stages = summary.by_stage
    labels = [f"{g.key}\n{g.offered_rps:.3g} req/s" for g in stages]
    fig = Figure(figsize=SIZE)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar(np.arange(len(stages)) + (i - (len(series) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(np.arange(len(stages)), labels, fontsize="small")
    ax.set(ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small")
    return _svg(fig)


def slo_attainment(summary: Summary) -> str | None:
    """Per stage, the share of requests with an SLO answered OK within it."""
    if all(g.slo_attainment is None for g in summary.by_stage):
        return None
    values = [100 * (g.slo_attainment or 0.0) for g in summary.by_stage]
    return _stage_bars(summary, {"SLO met": values}, "% of requests with an SLO", "SLO attainment per stage")


def rejections(summary: Summary) -> str:
    """Per stage, the shares rejected (429), timed out, and failed otherwise."""
    stages = summary.by_stage
    series = {"rejected (429)": [100 * g.rejection_rate for g in stages],
              "timed out": [100 * g.timeout_rate for g in stages],
              "other errors": [100 * (g.error_rate - g.rejection_rate - g.timeout_rate) for g in stages]}
    return _stage_bars(summary, series, "% of requests", "Rejections and failures per stage")


def choice_of(r: Record) -> str:
    """What a request got: the model and its sampling settings, or how it failed."""
    if r.ok:
        settings = r.settings or {}
        detail = " ".join(f"{settings[k]}" for k in ("sampler", "steps") if k in settings)
        return f"{r.model} {detail}".strip() if detail else str(r.model)
    return "rejected (429)" if r.rejected else "timed out" if r.timed_out else "failed"


def choices_over_time(run: RunData) -> str | None:
    """Requests per second by what served them, over the run: the policy's choices as load changes."""
    records = _measured(run)
    if not records:
        return None
    end = max(r.intended_send for r in records)
    width = max(1.0, end / 60)       # at most ~60 bins, at least a second each
    bins = np.arange(0, end + width, width)
    counts: dict[str, np.ndarray] = {}
    for label in sorted({choice_of(r) for r in records}):
        times = [r.intended_send for r in records if choice_of(r) == label]
        counts[label] = np.histogram(times, bins)[0] / width
    fig = Figure(figsize=(SIZE[0] * 1.4, SIZE[1]))
    ax = fig.add_subplot()
    ax.stackplot(bins[:-1], *counts.values(), labels=list(counts), step="post")
    for w in run.windows[1:]:
        ax.axvline(w.start, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="intended send time (s)", ylabel="req/s", title="What served the requests, over time")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return _svg(fig)


def batch_occupancy(run: RunData) -> str | None:
    """The scraped batch occupancy gauges over time (None: no metrics scraped)."""
    series = occupancy_series(run.metrics_path)
    if not series:
        return None
    fig = Figure(figsize=(SIZE[0] * 1.4, SIZE[1]))
    ax = fig.add_subplot()
    for name, (times, values) in sorted(series.items()):
        ax.plot(times, values, label=name)
    ax.set(xlabel="time (s)", ylabel="occupancy / batch size", title="Batch occupancy (scraped)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return _svg(fig)
