"""Serve's default autoscaling policy (ongoing requests per replica) against genserve's row-demand policy for the
step engine (serving/engine/autoscaling.py), under the same load steps, side by side on a local Ray.

Diffusion runs at 1-2 replicas with a 4-row budget (so this 2-core machine can fill it). Two closed-loop load
steps, each for LOAD_S:
- heavy: 3 clients of guided 2-image requests (4 rows each, a whole budget): the batch is full and requests
  queue, so a second replica helps; both policies should add it;
- light: 3 clients of unguided 1-image requests (1 row each): they share ONE forward per step in a budget of
  4, so a second replica adds nothing but a second copy of the model; request counting scales anyway.

Reports, per policy and load: when the second replica was asked for (the controller's target), the replicas
at the end, and the clients' p50 / p95. `python -m benchmarks.autoscaling` writes
benchmarks/results/autoscaling.{json,md}."""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
PORT = 18123
LOAD_S = 30
CLIENTS = 3
AUTOSCALE = {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1, "upscale_delay_s": 1,
             "downscale_delay_s": 5, "look_back_period_s": 2, "metrics_interval_s": 0.5}
POLICIES = {"ongoing requests (Serve's default, target 0.5)": {"target_ongoing_requests": 0.5},
            "row demand (genserve, target 0.75 of a batch)":
                {"policy": {"policy_function": "serving.engine.autoscaling:row_demand_policy"}}}
LOADS = {"heavy: 4-row requests": {"n": 2, "guidance_scale": 2.0, "prompt": "trouser"},
         "light: 1-row requests": {"n": 1, "guidance_scale": 1.0, "prompt": "trouser"}}
STEPS = {"sampler": "ddim", "steps": 50}


def app(store: str, autoscaling: dict[str, Any]) -> dict[str, Any]:
    from genserve.launch import load_config

    base = dict(load_config()["applications"][0])
    return base | {"args": {**base["args"], "store": store, "models": ["diffusion@latest"]},
                   "deployments": [{"name": "Ingress", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0}},
                                   {"name": "diffusion", "autoscaling_config": {**AUTOSCALE, **autoscaling},
                                    "ray_actor_options": {"num_cpus": 0.5}, "user_config": {"max_batch_rows": 4}}]}


def run(store: str, autoscaling: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """One policy under one load step, on a fresh local Ray."""
    from ray import serve

    from genserve.launch import deploy_local, start_local_ray, stop_local_ray

    start_local_ray(num_cpus=2, log_to_driver=False)
    try:
        deploy_local({"proxy_location": "EveryNode", "http_options": {"host": "127.0.0.1", "port": PORT},
                      "applications": [app(store, autoscaling)]}, timeout_s=300)
        data = json.dumps({"model": "diffusion", **STEPS, **body}).encode()
        stop, latencies = threading.Event(), []

        def client() -> None:
            while not stop.is_set():
                start = time.monotonic()
                req = urllib.request.Request(f"http://127.0.0.1:{PORT}/v1/images/generations", data,
                                             {"content-type": "application/json"})
                with urllib.request.urlopen(req, timeout=120) as r:
                    r.read()
                latencies.append(time.monotonic() - start)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        asked_at, targets = None, []
        while time.monotonic() - t0 < LOAD_S:
            status = serve.status().applications["genserve"].deployments["diffusion"]
            target = sum(status.replica_states.values())
            targets.append(target)
            if target >= 2 and asked_at is None:
                asked_at = time.monotonic() - t0
            time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(150)
        ms = sorted(x * 1000 for x in latencies)
        return {"second_replica_after_s": None if asked_at is None else round(asked_at, 1),
                "replicas_at_end": targets[-1], "mean_replicas": round(statistics.fmean(targets), 2),
                "requests": len(ms), "p50_ms": round(ms[len(ms) // 2]), "p95_ms": round(ms[int(len(ms) * 0.95)])}
    finally:
        stop_local_ray()


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    import tempfile

    from genserve.build import build
    from model_store import ModelStore

    store = ModelStore.open(Path(tempfile.mkdtemp(prefix="genserve-autoscaling-")) / "store")
    build(store, families=("diffusion",), log=lambda _: None)
    results = {}
    for load, body in LOADS.items():
        for policy, autoscaling in POLICIES.items():
            results[f"{load} | {policy}"] = r = run(store.uri, autoscaling, body)
            print(f"{load:24} {policy:48} {r}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "autoscaling.json").write_text(json.dumps(
        {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "clients": CLIENTS, "load_s": LOAD_S,
         "autoscaling_config": AUTOSCALE, "steps": STEPS, "results": results}, indent=2) + "\n")
    rows = ["| load | policy | second replica asked after | replicas at end (mean) | requests | p50 ms | p95 ms |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for key, r in results.items():
        load, policy = key.split(" | ")
        after = "never" if r["second_replica_after_s"] is None else f"{r['second_replica_after_s']} s"
        rows.append(f"| {load} | {policy} | {after} | {r['replicas_at_end']} ({r['mean_replicas']}) | {r['requests']} "
                    f"| {r['p50_ms']} | {r['p95_ms']} |")
    (RESULTS / "autoscaling.md").write_text(
        f"Diffusion at 1-2 replicas, a 4-row budget, {CLIENTS} closed-loop clients of 50-step DDIM for {LOAD_S} s, "
        "local Ray on 2 cores (`python -m benchmarks.autoscaling`).\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
