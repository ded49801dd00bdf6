"""Overload: the step engine (diffusion) at three times its measured capacity, through the load generator.

    python -m benchmarks.overload [--out benchmarks/results] [--store model_store_data] [--overload-s 60]
    python -m benchmarks.overload --reanalyse     the figures again from the recorded runs (OUT/runs/overload-*)

1. Capacity: a Poisson ramp of guided diffusion requests (dpmpp_2m, 10 steps, latency_slo_ms 3000), 15 s
   a stage; capacity is the highest offered rate whose requests were answered OK within the SLO at >= 99%
   (a rejection counts against it).
2. Overload, then recovery: 3x capacity for 60 s (three in four requests with the 3 s SLO, one in four with
   none, whose deadline is the ingress timeout), then 0.25x capacity for 30 s. Reported: the share of
   ADMITTED requests (not refused with 429 / 503) answered within their deadline at the client, timed from
   their intended send (target >= 99%), the share refused and how fast (from the actual send), the RSS of
   every Serve process of the app (replicas and the HTTP proxy, sampled each second by pid: Ray's named
   actors, asked their pid), and how long after the load drops the median latency is back within 25% (+50 ms)
   of its low-load value (the ramp's first stage, before any overload). The machine's load average and the sampler's longest gap are recorded with them:
   this machine is shared, and a figure taken while it stalls says so.

Figures go to OUT/overload.md and OUT/overload.json, the runs to OUT/runs/overload-*. One local Ray of 2
CPUs: the ingress, and the diffusion replica on one CPU (one ONNX Runtime thread), as benchmarks/serving.py
sets them up. Not part of the test suite: about five minutes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks.serving import genserve_app, load, raw_rows_per_second, serving, write
from genserve.build import build
from loadtests.records import RunData, load_run
from loadtests.scenario import OpenLoop, Stage, Template
from loadtests.stats import group_stats
from model_store.store import ModelStore

APP = "overload"
SLO_MS = 3000.0
STEPS = 10
WITH_SLO = Template(weight=3, model="diffusion", prompt="sneaker", sampler="dpmpp_2m", steps=STEPS,
                    guidance_scale=2.0, latency_slo_ms=SLO_MS)
NO_SLO = Template(weight=1, model="diffusion", prompt="sneaker", sampler="dpmpp_2m", steps=STEPS, guidance_scale=2.0)
RAMP = (0.2, 0.35, 0.5, 0.65, 0.8, 0.95)     # x the raw ceiling
STAGE_S = 15.0
FACTOR, LOW = 3.0, 0.25                     # x capacity: the overload, and the rate after it
RECOVERY_S = 30.0
INGRESS_TIMEOUT_S = 120.0                   # the no-SLO requests' deadline (deploy/serve_config.yaml)
RECOVERED, SLACK_S = 1.25, 0.05             # recovered: p50 <= this factor x its low-load value + this slack
                                            # (a 2-s window's p50 jitters by tens of ms here even at low load)
REFUSED = (429, 503)


# ---- the replica processes' memory -------------------------------------------------------------------------

def serve_processes(app: str) -> dict[str, int]:
    """label -> pid of every replica of `app` and of the HTTP proxy: Ray's named actors, each asked its pid."""
    import ray

    names = [(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{app}#") or a["name"].startswith("SERVE_PROXY_ACTOR")]
    pids = {}
    for name, namespace in names:
        actor = ray.get_actor(name, namespace=namespace)
        label = name.split("#")[1] if name.startswith("SERVE_REPLICA") else "proxy"
        pids[label] = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    return pids


class RSSSampler:
    """RSS (MB) of the given processes every `period_s`, in a thread, from start() to stop()."""

    def __init__(self, pids: dict[str, int], period_s: float = 1.0):
        self.procs = {label: psutil.Process(pid) for label, pid in pids.items()}
        self.period_s = period_s
        self.samples: list[dict[str, float]] = []   # {"t": seconds since start, label: MB, ...}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> RSSSampler:
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> list[dict[str, float]]:
        self._stop.set()
        self._thread.join()
        return self.samples

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = {"t": round(time.monotonic() - self.t0, 2)}
            for label, proc in self.procs.items():
                try:
                    sample[label] = round(proc.memory_info().rss / 2**20, 1)
                except psutil.NoSuchProcess:
                    sample[label] = float("nan")
            self.samples.append(sample)
            self._stop.wait(self.period_s)


# ---- the phases --------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_capacity(url: str, out: Path, ceiling_rps: float) -> RunData:
    rates = [round(f * ceiling_rps, 2) for f in RAMP]
    return load(url, out, "overload-capacity", [WITH_SLO], OpenLoop("poisson", tuple(Stage(r, STAGE_S) for r in rates)),
                warmup_s=5.0, timeout_s=30.0)


def capacity(run: RunData) -> tuple[float, list[dict[str, Any]], float | None]:
    """The capacity (req/s), the ramp's table, and the p50 (s) at its first, lowest stage."""
    rows = []
    for w in run.windows:
        stage = [r for r in run.records if not r.warmup and r.stage == w.stage]
        s = group_stats(f"stage {w.stage}", stage, w.start, w.end, w.offered_rate)
        rows.append({"rate": w.offered_rate, "requests": s.requests, "within_slo": s.slo_attainment,
                     "p50_ms": _ms(s.p50_s), "p99_ms": _ms(s.p99_s), "refused": _share(stage, REFUSED),
                     "expired": _share(stage, (504,))})
    held = [row["rate"] for row in rows if (row["within_slo"] or 0) >= 0.99]
    low = _p50([r for r in run.records if not r.warmup and r.stage == 0])
    return (max(held) if held else run.windows[0].offered_rate), rows, low


def run_overload(url: str, out: Path, cap: float, overload_s: float) -> tuple[RunData, list, dict[str, int]]:
    """The overload and recovery run, and the RSS samples taken over it (and the pids sampled)."""
    high, low = round(FACTOR * cap, 2), round(LOW * cap, 2)
    pids = serve_processes(APP)
    sampler = RSSSampler(pids).start()
    run = load(url, out, "overload-3x", [WITH_SLO, NO_SLO],
               OpenLoop("poisson", (Stage(high, overload_s), Stage(low, RECOVERY_S))), warmup_s=0.0,
               timeout_s=INGRESS_TIMEOUT_S + 10)
    return run, sampler.stop(), pids


def overload(run: RunData, rss: list, pids: dict[str, int], baseline: float | None) -> dict[str, Any]:
    """The figures of the overload run; baseline: the p50 (s) at low load before it, which recovery is
    measured against."""
    high, low = run.windows[0].offered_rate, run.windows[1].offered_rate
    overload_s = run.windows[0].end - run.windows[0].start
    over = [r for r in run.records if r.stage == 0]
    after = [r for r in run.records if r.stage == 1]

    def deadline_s(r) -> float:
        return (r.slo_ms or INGRESS_TIMEOUT_S * 1000) / 1000

    admitted = [r for r in over if r.status not in REFUSED]
    met = [r for r in admitted if r.ok and r.latency_s <= deadline_s(r)]
    missed = sorted((r for r in admitted if r not in met), key=lambda r: r.intended_send)
    refused = [r for r in over if r.status in REFUSED]
    by_class = {}
    for name, index in ((f"slo_{SLO_MS / 1000:g}s", 0), ("no_slo", 1)):
        mine = [r for r in over if r.template == index]
        mine_admitted = [r for r in mine if r.status not in REFUSED]
        ok = [r.latency_s for r in mine if r.ok]
        by_class[name] = {
            "requests": len(mine), "admitted": len(mine_admitted),
            "met_deadline_of_admitted": _frac(sum(r.ok and r.latency_s <= deadline_s(r) for r in mine_admitted),
                                              len(mine_admitted)),
            "refused_429": sum(r.status == 429 for r in mine), "refused_503": sum(r.status == 503 for r in mine),
            "expired_504": sum(r.status == 504 for r in mine),
            "p50_ms": _ms(np.percentile(ok, 50) if ok else None), "p99_ms": _ms(np.percentile(ok, 99) if ok else None)}
    refusal_s = [r.latency_s - (r.actual_send - r.intended_send) for r in refused]   # the server's part
    drop_at = run.windows[1].start
    recovery_s = _recovery(after, drop_at, baseline)
    labels = [k for k in rss[0] if k != "t"] if rss else []
    memory = {label: _growth([s[label] for s in rss]) for label in labels}
    lag = [r.actual_send - r.intended_send for r in run.records]
    return {
        "offered_rps": high, "low_rps": low, "overload_s": overload_s, "requests": len(over),
        "admitted": len(admitted), "admitted_met_deadline": _frac(len(met), len(admitted)),
        # never a late 200: what missed its deadline was answered 504 at it, or it is counted here
        "late_200": sum(r.ok and r.latency_s > deadline_s(r) for r in admitted),
        "missed": [{"sent_s": round(r.intended_send, 2), "status": r.status, "latency_ms": _ms(r.latency_s)}
                   for r in missed],
        "refused": _frac(len(refused), len(over)), "refused_429": sum(r.status == 429 for r in over),
        "refused_503": sum(r.status == 503 for r in over), "expired_504": sum(r.status == 504 for r in over),
        "errors_other": sum(r.status not in (200, 504, *REFUSED) for r in over),
        "refusal_p50_ms": _ms(np.percentile(refusal_s, 50) if refusal_s else None),
        "refusal_p99_ms": _ms(np.percentile(refusal_s, 99) if refusal_s else None),
        "served_rps": sum(r.ok for r in over) / overload_s, "by_class": by_class,
        "send_lag_p99_ms": _ms(np.percentile(lag, 99)), "rss_sampler_max_gap_s": _max_gap(rss),
        "low_load_p50_ms": _ms(baseline), "p50_recovery_s": recovery_s, "recovery_stage_p50_ms": _ms(_p50(after)),
        "recovery_p50_ms_by_second": _rolling_p50(after, drop_at),
        "rss_mb": memory, "rss_samples": rss, "pids": pids}


def _recovery(records, drop_at: float, baseline: float | None) -> float | None:
    """Seconds from the drop to the first request sent after it whose 2-s window of sends (it and the ones
    after it) has its p50 within RECOVERED x the low-load p50 + SLACK_S: by then the backlog the overload left is
    gone. (Not "and stays there": this machine is shared, and a later stall is not the overload's.)"""
    if baseline is None:
        return None
    ok = sorted((r for r in records if r.ok), key=lambda r: r.intended_send)
    for r in ok:
        window = [q for q in ok if r.intended_send <= q.intended_send < r.intended_send + 2.0]
        if _p50(window) <= RECOVERED * baseline + SLACK_S:
            return round(r.intended_send - drop_at, 2)
    return None


def _rolling_p50(records, drop_at: float, width_s: float = 2.0) -> list[tuple[float, float | None]]:
    """(seconds after the drop, p50 ms of the OK requests sent in [t, t + width)) for t = 0, 1, 2, ..."""
    out = []
    for t in range(0, int(RECOVERY_S - width_s) + 1):
        window = [r for r in records if drop_at + t <= r.intended_send < drop_at + t + width_s]
        out.append((float(t), _ms(_p50(window))))
    return out


def _growth(values: list[float]) -> dict[str, float]:
    """start / end: medians of the first / last five samples; second_half: growth from the run's middle to
    its end (a leak keeps growing; a high-water mark reached in the burst does not)."""
    v = [x for x in values if not math.isnan(x)]   # NaN: the process was gone
    head, middle, tail = np.median(v[:5]), np.median(v[len(v) // 2:len(v) // 2 + 5]), np.median(v[-5:])
    return {"start": round(float(head), 1), "end": round(float(tail), 1), "max": round(float(max(v)), 1),
            "growth": round(float(tail - head), 1), "second_half": round(float(tail - middle), 1)}


def _clusters(times: list[float], gap_s: float = 1.0) -> str:
    """'33.5-33.7 (15), 9.4 (1)': send times grouped where less than gap_s apart; a stall shows as one group."""
    groups: list[list[float]] = []
    for t in sorted(times):
        if groups and t - groups[-1][-1] < gap_s:
            groups[-1].append(t)
        else:
            groups.append([t])
    return ", ".join(f"{g[0]:g}" + (f"-{g[-1]:g}" if len(g) > 1 else "") + f" ({len(g)})" for g in groups) or "—"


def _max_gap(samples: list[dict[str, float]]) -> float | None:
    times = [s["t"] for s in samples]
    return round(max(np.diff(times)), 2) if len(times) > 1 else None


def _p50(records) -> float | None:
    ok = [r.latency_s for r in records if r.ok]
    return float(np.median(ok)) if ok else None


def _share(records, statuses) -> float:
    return _frac(sum(r.status in statuses for r in records), len(records))


def _frac(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(float(seconds) * 1000, 1)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.1f}%"


def markdown(data: dict[str, Any]) -> str:
    o = data["overload"]
    lines = [f"Step engine (diffusion, guided dpmpp_2m/{STEPS}) on one CPU, a 2-CPU local Ray; raw ceiling "
             f"{data['raw_rows_per_s_at_64']:.0f} rows/s at batch 64 = {data['ceiling_rps']:.1f} req/s.", "",
             f"**Capacity** (highest rate with >= 99% answered OK within the {SLO_MS / 1000:g} s SLO, Poisson, "
             f"{STAGE_S:g} s a stage): **{data['capacity_rps']:g} req/s**.", "",
             "| offered req/s | requests | within SLO | p50 (ms) | p99 (ms) | refused | expired |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in data["ramp"]:
        lines.append(f"| {row['rate']:g} | {row['requests']} | {_pct(row['within_slo'])} | {row['p50_ms']} | "
                     f"{row['p99_ms']} | {_pct(row['refused'])} | {_pct(row['expired'])} |")
    lines += ["", f"**Overload**: {o['offered_rps']:g} req/s ({FACTOR:g}x capacity) for {o['overload_s']:g} s, "
              f"3/4 with the {SLO_MS / 1000:g} s SLO and 1/4 with none (deadline: the ingress timeout, "
              f"{INGRESS_TIMEOUT_S:g} s); then {o['low_rps']:g} req/s for {RECOVERY_S:g} s.", "",
              "| figure | value |", "|---|---:|",
              f"| requests sent during the overload | {o['requests']} |",
              f"| admitted (not refused) | {o['admitted']} |",
              f"| **admitted requests answered within their deadline, at the client** | **{_pct(o['admitted_met_deadline'])}** |",
              f"| admitted that missed it: answered 504 at the deadline / a late 200 | "
              f"{sum(m['status'] == 504 for m in o['missed'])} / {o['late_200']} |",
              f"| when the misses were sent (s into the overload) | {_clusters([m['sent_s'] for m in o['missed']])} |",
              f"| refused | {_pct(o['refused'])} ({o['refused_429']} x 429 by the policy, {o['refused_503']} x 503 by a "
              f"full queue) |",
              f"| refusal latency p50 / p99 | {o['refusal_p50_ms']} / {o['refusal_p99_ms']} ms |",
              f"| expired (504) / other errors | {o['expired_504']} / {o['errors_other']} |",
              f"| load generator's send lag p99 | {o['send_lag_p99_ms']} ms |",
              f"| served during the overload | {o['served_rps']:.1f} req/s |",
              f"| p50 at low load before the overload / over the {RECOVERY_S:g} s after it | {o['low_load_p50_ms']} / "
              f"{o['recovery_stage_p50_ms']} ms |",
              f"| **p50 back within {RECOVERED:g}x of it + {SLACK_S * 1000:g} ms** | **{o['p50_recovery_s']} s after the "
              "drop** |", "",
              "| class | requests | admitted | met deadline (of admitted) | 429 | 503 | 504 | p50 / p99 served (ms) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c in o["by_class"].items():
        lines.append(f"| {name} | {c['requests']} | {c['admitted']} | {_pct(c['met_deadline_of_admitted'])} | "
                     f"{c['refused_429']} | {c['refused_503']} | {c['expired_504']} | {c['p50_ms']} / {c['p99_ms']} |")
    lines += ["", "RSS of the app's Serve processes (MB, sampled each second from the overload's start to the end "
              "of the recovery; start / end are medians of the first / last five samples, second half: from the "
              f"run's middle to its end; the sampler's longest gap was {o['rss_sampler_max_gap_s']} s):", "",
              "| process | start | max | end | growth | growth, second half |", "|---|---:|---:|---:|---:|---:|"]
    for label, m in o["rss_mb"].items():
        lines.append(f"| {label} | {m['start']} | {m['max']} | {m['end']} | {m['growth']:+} | {m['second_half']:+} |")
    lines += ["", f"Machine load average (1 min) before / after: {data['loadavg_before']:.1f} / "
              f"{data['loadavg_after']:.1f} on {os.cpu_count()} CPUs (shared with other work)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overload", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--store", default="model_store_data")
    parser.add_argument("--overload-s", type=float, default=60.0)
    parser.add_argument("--reanalyse", action="store_true",
                        help="recompute the figures from OUT/runs/overload-* and OUT/overload.json's samples")
    args = parser.parse_args(argv)
    if args.reanalyse:
        old = json.loads((args.out / "overload.json").read_text())
        runs = load_run(args.out / "runs" / "overload-capacity"), load_run(args.out / "runs" / "overload-3x")
        cap, ramp, low_p50 = capacity(runs[0])
        o = old["overload"]
        data = {**old, "capacity_rps": cap, "ramp": ramp,
                "overload": overload(runs[1], o["rss_samples"], o["pids"], low_p50)}
        write(args.out, "overload", markdown(data), data)
        return
    store = ModelStore.open(args.store)
    build(store, families=("diffusion",), log=lambda line: print(line, flush=True))   # a no-op when current
    loadavg_before = os.getloadavg()[0]
    raw = raw_rows_per_second(store.uri, "diffusion", batches=(64,))[64]
    ceiling = raw / (2 * STEPS)   # guided: two rows a step
    with serving([genserve_app(APP, "/", store.uri, "diffusion", "step")], port=free_port()) as url:
        cap, ramp, low_p50 = capacity(run_capacity(url, args.out, ceiling))
        print(f"capacity: {cap:g} req/s", flush=True)
        result = overload(*run_overload(url, args.out, cap, args.overload_s), low_p50)
    data = {"raw_rows_per_s_at_64": raw, "ceiling_rps": ceiling, "slo_ms": SLO_MS, "steps": STEPS,
            "capacity_rps": cap, "ramp": ramp, "overload": result, "loadavg_before": loadavg_before,
            "loadavg_after": os.getloadavg()[0]}
    write(args.out, "overload", markdown(data), data)


if __name__ == "__main__":
    main()
