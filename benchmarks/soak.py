"""Soak: a few minutes of steady mixed load, and the memory of every Serve process of the app held to a bound.

    python -m benchmarks.soak [--out benchmarks/results] [--store model_store_data] [--minutes 3] [--warmup-s 45]

The app serves gan (one-pass) and diffusion (the step engine) behind the ingress; a Poisson load of
GAN_RPS gan requests and DIFFUSION_RPS diffusion requests a second runs for the warm-up and then `minutes`.
Each replica process's RSS (and the HTTP proxy's) is sampled every SAMPLE_S by pid (Ray's named actors,
asked their pid). After the warm-up, a process's growth is the median of its last five samples minus the
median of its first five; the check fails if any process grew more than LIMIT_MB. (Triton's own soak allows
100 MB of heap growth; genserve is held to LIMIT_MB over the run.)

Negative control, in the same run: a second application ("leaky", under /leaky) whose gan replica keeps
LEAK_KB of every answer it gives (LeakyOnePass, defined here and nowhere in serving/: no production path
can turn it on) gets its own steady gan load; the same check must fail on it. Figures go to OUT/soak.md and
OUT/soak.json, the runs to OUT/runs/soak-*. Not part of the test suite.
"""
from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from benchmarks.overload import RSSSampler, free_port, serve_processes
from benchmarks.serving import load, serving, write
from genserve.build import build
from genserve.launch import load_config
from loadtests.scenario import OpenLoop, Stage, Template
from loadtests.stats import summarize
from model_store.store import ModelStore
from serving.api.ingress import Ingress
from serving.onepass.deployment import OnePassDeployment

APP, LEAKY = "soak", "leaky"
GAN_RPS, DIFFUSION_RPS, LEAKY_RPS = 16.0, 2.0, 8.0
MIX = [Template(weight=GAN_RPS, model="gan", prompt="coat", n=1),
       Template(weight=DIFFUSION_RPS, model="diffusion", prompt="sneaker", sampler="dpmpp_2m", steps=10,
                guidance_scale=2.0, latency_slo_ms=5000)]
SAMPLE_S = 5.0
LIMIT_MB = 25.0       # per process, after the warm-up, over the run
LEAK_KB = 32          # what the negative control's replica keeps per answer


@serve.deployment(ray_actor_options={"num_cpus": 0})
class LeakyOnePass(OnePassDeployment.func_or_class):
    """The negative control: a one-pass replica that keeps LEAK_KB of every answer (a cache that never
    evicts, the classic leak)."""

    async def generate(self, job):
        result = await super().generate(job)
        self.kept = getattr(self, "kept", [])
        self.kept.append(np.ones(LEAK_KB * 256, np.float32))  # 4 bytes each: LEAK_KB kB
        return result


def leaky_app(args: dict[str, Any]):
    """The negative control's application (import path benchmarks.soak:leaky_app): the real ingress over a
    LeakyOnePass serving gan."""
    store = ModelStore.open(args["store"])
    manifest = store.manifest("gan@latest")
    gan = LeakyOnePass.options(name="gan").bind(store.uri, "gan@latest")
    return Ingress.options(name="Ingress").bind({"gan": gan}, {"gan": manifest}, 120.0, True)


def soak_app(store: str) -> dict[str, Any]:
    """genserve's own application from deploy/serve_config.yaml, serving gan and diffusion, one replica each:
    the shipped bounds and settings, on this machine's 2 CPUs (gan and diffusion one each)."""
    app = dict(load_config()["applications"][0])
    keep = {"Ingress": 0, "gan": 1, "diffusion": 1}
    deployments = []
    for d in app["deployments"]:
        if d["name"] in keep:
            d = {k: v for k, v in d.items() if k not in ("autoscaling_config", "max_replicas_per_node")}
            deployments.append({**d, "num_replicas": 1, "ray_actor_options": {"num_cpus": keep[d["name"]]}})
    return {**app, "name": APP, "route_prefix": "/",
            "args": {**app["args"], "store": store, "models": ["gan@latest", "diffusion@latest"]},
            "deployments": deployments}


def growth(samples: list[dict[str, float]], label: str, warmup_s: float) -> dict[str, float]:
    """A process's RSS after the warm-up: first and last (medians of five samples), max, growth, MB."""
    v = [s[label] for s in samples if s["t"] >= warmup_s and s[label] == s[label]]
    head, tail = float(np.median(v[:5])), float(np.median(v[-5:]))
    return {"after_warmup": round(head, 1), "end": round(tail, 1), "max": round(max(v), 1),
            "growth": round(tail - head, 1), "samples": len(v), "passes": tail - head <= LIMIT_MB}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--store", default="model_store_data")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--warmup-s", type=float, default=45.0)
    args = parser.parse_args(argv)
    store = ModelStore.open(args.store)
    build(store, families=("gan", "diffusion"), log=lambda line: print(line, flush=True))   # no-op when current
    measure_s = args.minutes * 60
    apps = [soak_app(store.uri), {"name": LEAKY, "route_prefix": "/leaky", "import_path": "benchmarks.soak:leaky_app",
                                  "args": {"store": store.uri}}]
    with serving(apps, port=free_port()) as url:
        pids = {f"{APP}:{k}": v for k, v in serve_processes(APP).items()}
        pids |= {f"{LEAKY}:{k}": v for k, v in serve_processes(LEAKY).items() if k != "proxy"}
        sampler = RSSSampler(pids, SAMPLE_S).start()
        duration = args.warmup_s + measure_s
        with ThreadPoolExecutor(2) as pool:   # each load runs its own event loop, in its own thread
            main_run = pool.submit(load, url, args.out, "soak", MIX,
                                   OpenLoop("poisson", (Stage(GAN_RPS + DIFFUSION_RPS, duration),)),
                                   warmup_s=0.0, timeout_s=130)
            leaky_run = pool.submit(load, url + "/leaky", args.out, "soak-leaky", MIX[:1],
                                    OpenLoop("poisson", (Stage(LEAKY_RPS, duration),)), warmup_s=0.0, timeout_s=130)
            runs = {"soak": main_run.result(), "leaky": leaky_run.result()}
        samples = sampler.stop()
    processes = {label: growth(samples, label, args.warmup_s) for label in pids}
    traffic = {}
    for name, run in runs.items():
        s = summarize(run.records).overall
        traffic[name] = {"requests": s.requests, "ok": s.ok, "throughput_rps": round(s.throughput_rps, 2),
                         "p50_ms": round(s.p50_s * 1000, 1) if s.p50_s else None,
                         "p99_ms": round(s.p99_s * 1000, 1) if s.p99_s else None, "error_rate": round(s.error_rate, 4)}
    genserve_ok = all(p["passes"] for label, p in processes.items() if label.startswith(f"{APP}:"))
    control = processes.get(f"{LEAKY}:gan", {})
    data = {"minutes": args.minutes, "warmup_s": args.warmup_s, "limit_mb": LIMIT_MB, "leak_kb_per_answer": LEAK_KB,
            "rates": {"gan": GAN_RPS, "diffusion": DIFFUSION_RPS, "leaky_gan": LEAKY_RPS},
            "genserve_passes": genserve_ok, "negative_control_fails": not control.get("passes", True),
            "processes": processes, "traffic": traffic, "rss_samples": samples, "pids": pids}
    write(args.out, "soak", markdown(data), data)
    if not genserve_ok or control.get("passes", True):
        raise SystemExit("soak: the memory check did not come out as it should (see the table)")


def markdown(data: dict[str, Any]) -> str:
    t = data["traffic"]
    lines = [f"Soak: {data['minutes']:g} min of Poisson load after a {data['warmup_s']:g} s warm-up: "
             f"{data['rates']['gan']:g} gan + {data['rates']['diffusion']:g} diffusion (guided dpmpp_2m/10) req/s on "
             f"genserve's app (the shipped config, gan and diffusion one CPU each, a 2-CPU local Ray), and "
             f"{data['rates']['leaky_gan']:g} gan req/s on the negative control, whose replica keeps "
             f"{data['leak_kb_per_answer']} kB of every answer.", "",
             f"Check: no process's RSS grows more than **{data['limit_mb']:g} MB** from the end of the warm-up to the "
             "end (medians of five samples at each end; Triton allows 100 MB of heap growth over its soak). "
             f"genserve: **{'passes' if data['genserve_passes'] else 'FAILS'}**; the negative control: "
             f"**{'fails, as it should' if data['negative_control_fails'] else 'passes: the check is blind'}**.", "",
             "| process | after warm-up (MB) | max | end | growth | check |", "|---|---:|---:|---:|---:|---|"]
    for label, p in data["processes"].items():
        lines.append(f"| {label} | {p['after_warmup']} | {p['max']} | {p['end']} | {p['growth']:+} | "
                     f"{'pass' if p['passes'] else 'FAIL'} |")
    lines += ["", "| load | requests | OK | throughput (req/s) | p50 / p99 (ms) | errors |", "|---|---:|---:|---:|---:|---:|"]
    for name, s in t.items():
        lines.append(f"| {name} | {s['requests']} | {s['ok']} | {s['throughput_rps']} | {s['p50_ms']} / {s['p99_ms']} | "
                     f"{s['error_rate'] * 100:.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
