"""`genserve loadtest SCENARIO` and `genserve report RUN`: the command-line face of loadtests/."""
from __future__ import annotations

import argparse
import dataclasses
import shlex
from datetime import datetime, timezone
from pathlib import Path


def _loadtest(args: argparse.Namespace) -> None:
    from loadtests.records import load_run
    from loadtests.report import COLUMNS, markdown_table, table_rows
    from loadtests.runner import run_scenario
    from loadtests.scenario import load_scenario
    from loadtests.stats import summarize

    scenario = load_scenario(args.scenario)
    if args.url:
        scenario = dataclasses.replace(scenario, url=args.url)
    out = args.out or Path("runs") / f"{scenario.name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
    print(f"genserve: {scenario.name}: {scenario.duration_s:g} s against {scenario.url} ({scenario.protocol}), "
          f"writing {out}")
    # The command as run, with the default --out filled in.
    command = ["genserve", "loadtest", str(args.scenario), *(["--url", args.url] if args.url else []),
               "--out", str(out), *(["--no-progress"] if args.no_progress else [])]
    try:
        run_scenario(scenario, out, progress=not args.no_progress, command=shlex.join(command))
    except KeyboardInterrupt:
        print(f"genserve: interrupted; what was recorded is in {out}")
        raise SystemExit(130) from None
    run = load_run(out)
    summary = summarize(run.records, run.windows)
    print(markdown_table(COLUMNS, table_rows([*summary.by_stage, summary.overall])))
    print(f"genserve: wrote {out}; `genserve report {out}` makes the HTML report")


def _report(args: argparse.Namespace) -> None:
    from loadtests.report import write_report

    html_path, md_path = write_report(args.run, args.out)
    print(f"genserve: wrote {html_path} and {md_path}")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `genserve loadtest` and `genserve report` to the top-level command's subparsers."""
    p = subparsers.add_parser("loadtest", help="run a load-test scenario (YAML) against a server; record every request")
    p.add_argument("scenario", type=Path, help="e.g. loadtests/scenarios/smoke.yaml")
    p.add_argument("--url", default=None, help="the server (default: the scenario's url)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/NAME-UTCTIME/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_loadtest)

    p = subparsers.add_parser("report", help="HTML + Markdown report of a recorded load-test run")
    p.add_argument("run", type=Path, help="a run directory written by `genserve loadtest`")
    p.add_argument("--out", type=Path, default=None, help="HTML file (default: RUN/report.html)")
    p.set_defaults(func=_report)
