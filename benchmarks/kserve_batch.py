"""What n images cost in ONE KServe v2 request, against one image:

    python -m benchmarks.kserve_batch [--label before|after] [--calls 20] [--out benchmarks/results]

A local Ray (2 CPUs) serves gan and diffusion, one CPU each, through genserve's own app (admission on); v2
infer over HTTP (JSON in, binary image out) with n = 1, 4, 16 images of mixed classes and their own seeds,
diffusion at 10 steps, one call at a time: median and p90 of `--calls` calls after a few warm-up calls.
Each run is recorded under its label in OUT/kserve_batch.json (labels already there are kept), and
OUT/kserve_batch.md shows every label side by side.
"""
from __future__ import annotations

import argparse
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.serving import _deployment, serving
from genserve.build import build
from model_store.store import ModelStore

MODELS = {"gan": {}, "diffusion": {"steps": 10}}   # model -> the request's parameters
SIZES = (1, 4, 16)
WARMUP = 3


def app(store: str) -> dict[str, Any]:
    """genserve's app (deploy/serve_config.yaml) serving just MODELS, one replica and one CPU each."""
    from genserve.launch import load_config

    app = dict(load_config()["applications"][0])
    config = {d["name"]: d.get("user_config") for d in app["deployments"]}
    app.update(name="kserve", route_prefix="/", args={**app["args"], "store": store,
                                                      "models": [f"{m}@latest" for m in MODELS]},
               deployments=[_deployment("Ingress", 0), *(_deployment(m, 1, config[m]) for m in MODELS)])
    return app


def infer(url: str, model: str, n: int, parameters: dict[str, Any], call: int) -> np.ndarray:
    """One v2 infer of n images: classes 0..9 and NULL in turn, seeds distinct per call and image."""
    tensor = lambda name, values: {"name": name, "datatype": "INT64", "shape": [n], "data": values}  # noqa: E731
    body = json.dumps({"inputs": [tensor("class_id", [i % 11 for i in range(n)]),
                                  tensor("seed", [1000 * call + i for i in range(n)])],
                       "parameters": {**parameters, "binary_data_output": True}}).encode()
    request = urllib.request.Request(f"{url}/v2/models/{model}/infer", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        header, payload = int(response.headers["Inference-Header-Content-Length"]), response.read()
    images = np.frombuffer(payload[header:], np.uint8)
    assert images.size == n * 784, (model, n, images.size)
    return images


def measure(url: str, calls: int) -> dict[str, dict[int, dict[str, float]]]:
    """model -> n -> {p50_ms, p90_ms, per_image_ms}."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for model, parameters in MODELS.items():
        for n in SIZES:
            times = []
            for call in range(WARMUP + calls):
                start = time.perf_counter()
                infer(url, model, n, parameters, call)
                if call >= WARMUP:
                    times.append((time.perf_counter() - start) * 1000)
            p50, p90 = np.percentile(times, [50, 90])
            out.setdefault(model, {})[n] = {"p50_ms": round(p50, 1), "p90_ms": round(p90, 1),
                                            "per_image_ms": round(p50 / n, 2)}
            print(f"  {model:9} n={n:2}  p50 {p50:7.1f} ms  p90 {p90:7.1f} ms", flush=True)
    return out


def markdown(runs: dict[str, Any]) -> str:
    labels = list(runs)
    lines = ["# KServe v2: n images in one request", "",
             f"`python -m benchmarks.kserve_batch`: one call at a time, median (p90) ms of "
             f"{next(iter(runs.values()))['calls']} calls; gan, and diffusion at 10 steps; one CPU per model.", "",
             "| model | n | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for model in MODELS:
        for n in SIZES:
            cells = [f"{r['results'][model][str(n)]['p50_ms']:.1f} ({r['results'][model][str(n)]['p90_ms']:.1f})"
                     for r in runs.values()]
            lines.append(f"| {model} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kserve_batch", description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="after", help="the name of this run in the results (e.g. before)")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--store", default="model_store_data")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    store = ModelStore.open(args.store)
    build(store, log=lambda line: print(line, flush=True))   # a no-op when the store is current
    with serving([app(store.uri)], port=args.port) as url:
        results = measure(url, args.calls)
    path = args.out / "kserve_batch.json"
    runs = json.loads(path.read_text()) if path.exists() else {}
    runs[args.label] = {"calls": args.calls, "results": json.loads(json.dumps(results))}  # int keys as JSON's
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(runs, indent=2) + "\n")
    (args.out / "kserve_batch.md").write_text(markdown(runs) + "\n")
    print("\n" + markdown(runs) + f"\n\n(written to {args.out / 'kserve_batch'}.md and .json)", flush=True)


if __name__ == "__main__":
    main()
