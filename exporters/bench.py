"""ONNX Runtime vs torch: ms per forward of every graph at batch 1 and 64, side by side, same threads.

    python -m exporters.bench [--families gan vae] [--batches 1 64] [--threads 2] [--budget 1.0]

Uses the trained checkpoint of each family when there is one, else a randomly initialised model of the
default config (speed does not depend on the weights; the table says which). The ONNX graph is the one
`genserve build` ships (BASIC-optimized), run with ONNX Runtime's default online optimizations.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from core.contracts import sample_inputs
from exporters.graphs import graph_module
from exporters.onnx_export import export_family
from exporters.profile import machine_info, time_call
from core.runtime import choose_providers, make_session
from families.checkpoint import CHECKPOINT_ROOT, WEIGHTS_FILE, config_to_dict, load_model
from families.registry import FAMILIES, get_family


def _model(family: str, root: Path) -> tuple[torch.nn.Module, dict, str]:
    if (root / family / WEIGHTS_FILE).is_file():
        model, card = load_model(family, root / family)
        return model, card["config"], "trained"
    spec = get_family(family)
    config = spec.Config()
    return spec.build(config).eval(), config_to_dict(config), "random init"


def bench(families: list[str], batches: list[int], threads: int, budget_s: float, min_runs: int,
          root: Path = CHECKPOINT_ROOT) -> list[dict]:
    torch.set_num_threads(threads)
    choice = choose_providers()
    rows = []
    for family in families:
        model, config, origin = _model(family, root)
        with tempfile.TemporaryDirectory() as tmp:
            for g in export_family(family, model, config, Path(tmp), threads=threads):
                module = graph_module(g.contract, model).eval()
                session = make_session(g.path, threads=threads, choice=choice)
                for batch in batches:
                    feeds = sample_inputs(g.contract, batch, np.random.default_rng(batch))
                    args = tuple(torch.from_numpy(feeds[t.name]) for t in g.contract.inputs)
                    with torch.inference_mode():
                        torch_ms = time_call(lambda: module(*args), min_runs=min_runs, budget_s=budget_s)
                    ort_ms = time_call(lambda: session.run(None, feeds), min_runs=min_runs, budget_s=budget_s)
                    rows.append({"graph": g.contract.key, "weights": origin, "batch": batch,
                                 "torch_ms": torch_ms, "ort_ms": ort_ms})
                    print(f"  {g.contract.key:<20} batch {batch:>3}: torch {torch_ms:9.3f} ms   "
                          f"onnxruntime {ort_ms:9.3f} ms", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m exporters.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads and ONNX Runtime intra-op threads (same for both)")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timing per cell (median of runs)")
    parser.add_argument("--min-runs", type=int, default=5)
    parser.add_argument("--checkpoints", type=Path, default=CHECKPOINT_ROOT)
    args = parser.parse_args(argv)

    m = machine_info()
    choice = choose_providers()
    print(f"machine: {m.cpu} x{m.cpu_count}, load {m.load_average}; threads {args.threads}; "
          f"torch {torch.__version__}, onnxruntime {m.onnxruntime} on {choice.providers[0]} ({choice.reason})")
    rows = bench(args.families, args.batches, args.threads, args.budget, args.min_runs, args.checkpoints)
    print("\n| graph | weights | batch | torch ms/forward | ONNX Runtime ms/forward | ORT speedup |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['graph']} | {r['weights']} | {r['batch']} | {r['torch_ms']:.3f} | {r['ort_ms']:.3f} "
              f"| {r['torch_ms'] / r['ort_ms']:.2f}x |")


if __name__ == "__main__":
    main()
