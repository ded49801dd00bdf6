"""`genserve report RUN`: one self-contained HTML page (plots inline as SVG data URIs; no script, no external
CSS, nothing fetched) and a Markdown summary, RUN/report.md, both starting with the exact command and the
environment, so a number in them can be traced to how it was made."""
from __future__ import annotations

import base64
import html
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from loadtests import plots
from loadtests.records import RunData, load_run
from loadtests.stats import GroupStats, Summary, summarize

HTML_NAME, MARKDOWN_NAME = "report.html", "report.md"
COLUMNS = ("group", "requests", "offered req/s", "throughput req/s", "goodput req/s", "p50 ms", "p90 ms", "p99 ms",
           "SLO met", "rejected", "timed out", "errors", "send lag p99 ms")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def table_rows(groups: Sequence[GroupStats]) -> list[list[str]]:
    """One row of COLUMNS per group."""
    return [[g.key, str(g.requests), f"{g.offered_rps:.2f}", f"{g.throughput_rps:.2f}", f"{g.goodput_rps:.2f}",
             _ms(g.p50_s), _ms(g.p90_s), _ms(g.p99_s), _pct(g.slo_attainment), _pct(g.rejection_rate),
             _pct(g.timeout_rate), _pct(g.error_rate), f"{g.send_lag_p99_s * 1000:.1f}"] for g in groups]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _sections(summary: Summary) -> list[tuple[str, list[GroupStats]]]:
    return [(title, groups) for title, groups in (
        ("Overall", [summary.overall]), ("Per stage", summary.by_stage), ("Per served model", summary.by_model),
        ("Per step count", summary.by_steps)) if groups]


def _environment(meta: dict[str, Any]) -> list[tuple[str, str]]:
    env = meta["environment"]
    return [("started (UTC)", meta.get("started_at", "?")),
            ("wall time", f"{meta.get('wall_s', '?')} s, {meta.get('requests', '?')} requests"
                          + ("" if meta.get("complete") else " (incomplete: the run was interrupted)")),
            ("client machine", f"{env['hostname']}: {env['cpu']} x {env['cpu_count']}, {env['os']}"),
            ("versions", ", ".join(f"{k} {v}" for k, v in {"python": env["python"], **env["packages"]}.items())),
            ("server", meta["scenario"]["url"] + f" ({meta['scenario']['protocol']})"),
            ("served models", _served_models(meta.get("server")))]


def _served_models(server: Any) -> str:
    """GET /v1/models's answer as one line: name family@version on provider."""
    if isinstance(server, dict) and isinstance(server.get("data"), list):
        return "; ".join(f"{m.get('id')} ({m.get('family')}@{m.get('version')}, {m.get('provider')})"
                         for m in server["data"])
    return json.dumps(server)


def write_markdown(run: RunData, summary: Summary, path: Path) -> None:
    meta = run.meta
    parts = [f"# Load test: {meta['scenario']['name']}", "", "```", meta["command"], "```", "",
             markdown_table(("", ""), _environment(meta)), ""]
    for title, groups in _sections(summary):
        parts += [f"## {title}", "", markdown_table(COLUMNS, table_rows(groups)), ""]
    counts = Counter(plots.choice_of(r) for r in run.records if not r.warmup)
    parts += ["## What served the requests", "",
              markdown_table(("served by", "requests"), [[k, str(v)] for k, v in counts.most_common()]), ""]
    parts += ["## Scenario", "", "```yaml", yaml.safe_dump(meta["scenario"], sort_keys=False).strip(), "```", ""]
    path.write_text("\n".join(parts))


def _html_table(header: Sequence[str] | None, rows: Sequence[Sequence[str]]) -> str:
    """A table of numbers; with no header, a key-value table."""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    if header is None:
        return f"<table class='kv'><tbody>{body}</tbody></table>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(title: str, svg: str | None, missing: str) -> str:
    if svg is None:
        return f"<figure><h3>{html.escape(title)}</h3><p class='missing'>{html.escape(missing)}</p></figure>"
    uri = "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()
    return f"<figure><h3>{html.escape(title)}</h3><img class='plot' alt='{html.escape(title)}' src='{uri}'></figure>"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
pre{background:#f4f4f4;padding:.6em;overflow-x:auto}table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}td:first-child,th:first-child,.kv td{text-align:left}
img.plot{max-width:100%}figure{margin:1em 0}.missing{color:#777;font-style:italic}"""


def write_html(run: RunData, summary: Summary, path: Path) -> None:
    meta = run.meta
    name = html.escape(meta["scenario"]["name"])
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Load test: {name}</title>",
             f"<style>{_CSS}</style></head><body><h1>Load test: {name}</h1>",
             f"<h2>Command</h2><pre>{html.escape(meta['command'])}</pre>",
             "<h2>Environment</h2>" + _html_table(None, _environment(meta))]
    for title, groups in _sections(summary):
        parts.append(f"<h2>{title}</h2>" + _html_table(COLUMNS, table_rows(groups)))
    parts += ["<h2>Plots</h2>",
              _figure("Latency CDF per model", plots.latency_cdf(run), "no request was answered OK"),
              _figure("Latency and throughput vs offered load", plots.load_curves(summary), "no measured request"),
              _figure("SLO attainment per stage", plots.slo_attainment(summary), "no request had a latency SLO"),
              _figure("Rejections per stage", plots.rejections(summary), ""),
              _figure("Policy choices over time", plots.choices_over_time(run), "no measured request"),
              _figure("Batch occupancy", plots.batch_occupancy(run),
                      "no metrics scraped (set metrics_url in the scenario)"),
              f"<h2>Scenario</h2><pre>{html.escape(yaml.safe_dump(meta['scenario'], sort_keys=False))}</pre>",
              "</body></html>"]
    path.write_text("\n".join(parts))


def write_report(run_dir: str | Path, out: str | Path | None = None) -> tuple[Path, Path]:
    """Write the HTML report (to `out`, default RUN/report.html) and RUN/report.md; returns both paths."""
    run = load_run(run_dir)
    summary = summarize(run.records, run.windows)
    html_path = Path(out) if out else run.run_dir / HTML_NAME
    md_path = run.run_dir / MARKDOWN_NAME
    write_html(run, summary, html_path)
    write_markdown(run, summary, md_path)
    return html_path, md_path
