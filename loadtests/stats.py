"""Statistics over recorded requests: per stage, per served model, per step count, and overall.

    run = load_run(RUN_DIR)                       # loadtests.records
    summary = summarize(run.records, run.windows)
    summary.by_stage[0].p99_s, summary.overall.goodput_rps

Warm-up requests are left out. Latency percentiles are over the requests answered OK (a rejection is fast
and would flatter them); rejections, timeouts and errors are rates of their own. Throughput is counted over
a group's window stretched to its last answer, so a server that falls behind shows a throughput below the
offered load rather than a backlog hidden past the window's end."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from loadtests.records import Record
from loadtests.schedule import Window


@dataclass(frozen=True)
class GroupStats:
    key: str                        # the group: "stage 0", a model's name, "steps=10", "all"
    requests: int                   # measured requests (warm-up excluded)
    ok: int                         # ... answered OK
    window_s: float                 # what the rates below divide by
    offered_rps: float              # the stage's configured rate; else requests sent / sending window
    throughput_rps: float           # OK answers / window
    goodput_rps: float              # OK answers within their SLO / window (= throughput without SLOs)
    p50_s: float | None             # latency of the OK answers (None: no OK answer)
    p90_s: float | None
    p99_s: float | None
    mean_s: float | None
    slo_attainment: float | None    # of the requests with an SLO, the share answered OK within it (None: none had one)
    rejection_rate: float           # share rejected by admission control (429)
    timeout_rate: float             # share that timed out (504, or no answer within request_timeout_s)
    error_rate: float               # share not answered OK, whatever the reason
    send_lag_p99_s: float           # the generator's own lag behind its schedule: should be ~0 in an open loop


@dataclass(frozen=True)
class Summary:
    overall: GroupStats
    by_stage: list[GroupStats]      # in stage order
    by_model: list[GroupStats]      # by the model that served (the requested one when no answer said)
    by_steps: list[GroupStats]      # by the step count the server reports in settings (iterative models only)


def served_model(r: Record) -> str:
    return r.model or r.requested_model


def steps_of(r: Record) -> int | None:
    return (r.settings or {}).get("steps")


def within_slo(r: Record, slo_ms: float | None = None) -> bool:
    """Answered OK within its SLO (`slo_ms` overrides the request's own; no SLO at all: just OK)."""
    slo = slo_ms if slo_ms is not None else r.slo_ms
    return r.ok and (slo is None or r.latency_s * 1000 <= slo)


def group_stats(key: str, records: Sequence[Record], start: float, end: float, offered_rps: float | None = None,
                slo_ms: float | None = None) -> GroupStats:
    """Stats of `records`, sent in [start, end); with no offered_rps, the offered load is what was sent."""
    n = len(records)
    window = max([end, *(r.done_at for r in records)]) - start
    window = window if window > 0 else float("nan")
    ok = [r.latency_s for r in records if r.ok]
    p50, p90, p99 = np.percentile(ok, [50, 90, 99]).tolist() if ok else (None, None, None)
    with_slo = [r for r in records if (slo_ms if slo_ms is not None else r.slo_ms) is not None]
    good = sum(within_slo(r, slo_ms) for r in records)

    def share(count: int) -> float:
        return count / n if n else 0.0

    return GroupStats(
        key=key, requests=n, ok=len(ok), window_s=window,
        offered_rps=offered_rps if offered_rps is not None else n / (end - start) if end > start else 0.0,
        throughput_rps=len(ok) / window, goodput_rps=good / window,
        p50_s=p50, p90_s=p90, p99_s=p99, mean_s=float(np.mean(ok)) if ok else None,
        slo_attainment=sum(within_slo(r, slo_ms) for r in with_slo) / len(with_slo) if with_slo else None,
        rejection_rate=share(sum(r.rejected for r in records)), timeout_rate=share(sum(r.timed_out for r in records)),
        error_rate=share(n - len(ok)),
        send_lag_p99_s=float(np.percentile([r.actual_send - r.intended_send for r in records], 99)) if n else 0.0)


def _grouped(records: Sequence[Record], key: Callable[[Record], object]) -> dict[object, list[Record]]:
    groups: dict[object, list[Record]] = {}
    for r in records:
        if (k := key(r)) is not None:
            groups.setdefault(k, []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: str(kv[0])))


def summarize(records: Sequence[Record], windows: Sequence[Window] | None = None, *,
              slo_ms: float | None = None) -> Summary:
    """Per-stage, per-model, per-steps and overall stats of a run's records (warm-up left out).

    windows: each stage's measured window (RunData.windows); without them a stage spans its first to its
    last send. slo_ms: hold every request to this SLO instead of its own latency_slo_ms (for goodput at a
    given SLO)."""
    measured = [r for r in records if not r.warmup]
    by_stage = _grouped(measured, lambda r: r.stage)
    if windows is None:
        windows = [Window(s, min(r.intended_send for r in rs), max(r.intended_send for r in rs), rs[0].offered_rate)
                   for s, rs in by_stage.items()]
    spans = {w.stage: w for w in windows}
    start = min((w.start for w in windows), default=0.0)
    end = max((w.end for w in windows), default=0.0)
    return Summary(
        overall=group_stats("all", measured, start, end, slo_ms=slo_ms),
        by_stage=[group_stats(f"stage {w.stage}", by_stage.get(w.stage, []), w.start, w.end, w.offered_rate, slo_ms)
                  for w in sorted(spans.values(), key=lambda w: w.stage)],
        by_model=[group_stats(str(m), rs, start, end, slo_ms=slo_ms)
                  for m, rs in _grouped(measured, served_model).items()],
        by_steps=[group_stats(f"steps={s}", rs, start, end, slo_ms=slo_ms)
                  for s, rs in sorted(_grouped(measured, steps_of).items())])
