"""The GPU path, checked and measured in one run:

    python -m benchmarks.gpu [--store DIR] [--out benchmarks/results] [--quick] [--graphs gan.generate ...]

1. parity: every graph of every model in the store on the CUDA and TensorRT (FP16) execution providers
   against the CPU provider (the fp32 reference), on the same random in-domain inputs, within per-graph
   tolerances;
2. throughput: rows/s of every graph at batch 1, 2, 4, ... 256 on each provider (session.run with host
   inputs and outputs, as serving calls it);
3. the device step loop (serving/engine/device_loop.py): diffusion sampling with x kept on the device
   between steps (IOBinding, the sampler maths in torch there), against the same loop with host copies
   every step and, on CUDA, with ONNX Runtime's CUDA graphs for fixed batch buckets; its images are
   compared with the step engine's CPU path for the same seeds.

Where there is no NVIDIA GPU with onnxruntime-gpu, everything runs on CPUExecutionProvider and the output
says so: a fallback, so the tests exercise the code, never GPU figures. Writes OUT/gpu.md and OUT/gpu.json;
exits 1 when any check fails. scripts/gpu_check.sh runs it on the lent GPU machine.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort
import torch

from core.contracts import GraphContract, sample_inputs
from core.runtime import ProviderChoice, choose_providers, gpu_present, make_session, tensorrt_provider_options
from exporters.profile import batch_ladder, machine_info, time_call
from model_store import LoadedVersion, ModelStore
from serving.engine.device_loop import BoundDenoiser, HostDenoiser, sample_on_device
from serving.engine.diffusion import DiffusionStepper, to_uint8
from serving.engine.engine import EngineCore
from serving.engine.request import DiffusionRequest, make_state
from serving.engine.runner import OnnxRunner

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
PROVIDERS = {"cpu": [CPU], "cuda": [CUDA, CPU], "tensorrt-fp16": [TRT, CUDA, CPU]}  # label -> ORT providers
MAX_BATCH = 256
# Max abs difference vs the CPU output, divided by max(1, max |CPU output|), per graph: (fp32 on CUDA, which
# may use TF32 convolutions; FP16 on TensorRT). First guesses, to be confirmed by the first GPU run.
TOLERANCE = {"gan.generate": (1e-2, 5e-2), "vae.decode": (1e-2, 5e-2), "vae.encode": (1e-2, 5e-2),
             "flow.sample": (2e-2, 1e-1), "flow.log_prob": (1e-2, 5e-2), "pixelcnn.logits": (1e-2, 5e-2),
             "diffusion.denoise": (1e-2, 5e-2)}
DEFAULT_TOLERANCE = (1e-2, 5e-2)
PARITY_BATCH = 8
TRT_CACHE = Path("build/trt_cache")  # TensorRT engines take seconds to minutes to build: kept across runs
GUIDANCE = 2.0
SAMPLERS = ("ddim", "dpmpp_2m")
IMAGE_TOL = 2  # uint8 levels: device loop vs the engine's CPU path, after every step's rounding differences


@dataclass
class Mode:
    graphs: tuple[str, ...] | None    # None: every graph in the store
    batches: list[int]
    buckets: tuple[int, ...]          # device loop: images per batch (2x rows, guided)
    steps: int
    budget_s: float                   # timing per throughput cell
    repeats: int                      # timed device-loop runs (median)


FULL = Mode(None, batch_ladder(MAX_BATCH), (8, 32, 64), 20, 0.3, 3)
QUICK = Mode(("gan.generate", "diffusion.denoise"), [1, 2, 4], (2,), 3, 0.05, 1)


@dataclass
class Setup:
    """What this machine can run, and why not the rest."""

    device: torch.device                               # where the device loop keeps x
    labels: list[str]                                  # providers compared with the CPU reference
    unavailable: dict[str, str] = field(default_factory=dict)
    fallback: bool = False                             # no GPU provider at all: CPU vs CPU


def detect(log: Callable[[str], None] = print) -> Setup:
    """The providers this machine can really run: a listed GPU provider may still fail to load (onnxruntime-gpu
    lists TensorRT whether or not libnvinfer is installed), so each one opens a one-node graph first."""
    offered, cuda_torch = ort.get_available_providers(), torch.cuda.is_available()
    if not (gpu_present() or cuda_torch):
        why = "no NVIDIA GPU is visible"
    elif CUDA not in offered:
        why = f"onnxruntime {ort.__version__} offers only {', '.join(offered)} (install onnxruntime-gpu)"
    elif not cuda_torch:
        why = f"torch {torch.__version__} has no CUDA (the device loop's maths runs in torch)"
    else:
        torch.cuda.init()
        try:  # CUDA/cuDNN from the nvidia-* wheels beside torch (onnxruntime >= 1.21), if torch has not loaded them
            ort.preload_dlls(directory=str(Path(torch.__file__).parent.parent))
        except Exception as exc:  # noqa: BLE001 -- then the EP's own dlopen decides, and the probe says why
            log(f"onnxruntime.preload_dlls: {exc}")
        why = _probe(PROVIDERS["cuda"])
    if why:
        return Setup(torch.device("cpu"), ["cpu"], {"cuda": why, "tensorrt-fp16": why}, fallback=True)
    labels, unavailable = ["cuda"], {}
    trt_why = _probe(PROVIDERS["tensorrt-fp16"]) if TRT in offered else f"onnxruntime {ort.__version__} offers no {TRT}"
    if trt_why:
        unavailable["tensorrt-fp16"] = trt_why
    else:
        labels.append("tensorrt-fp16")
    return Setup(torch.device("cuda", 0), labels, unavailable)


def _probe(providers: list[str]) -> str | None:
    """None when a one-node graph opens and runs on providers[0], else why not."""
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in ("x", "y")]
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", io[:1], io[1:]),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=providers)
        session.run(None, {"x": np.ones(4, np.float32)})
    except Exception as exc:  # noqa: BLE001 -- the reason is the finding
        return f"{providers[0]} does not load: {type(exc).__name__}: {exc}"[:300]
    if session.get_providers()[0] != providers[0]:
        return (f"{providers[0]} does not load (onnxruntime fell back to {session.get_providers()}; "
                "its EP Error above says why)")
    return None


def open_session(label: str, loaded: LoadedVersion, contract: GraphContract, *, threads: int | None,
                 cache_dir: Path | None = None, cuda_options: dict[str, str] | None = None) -> ort.InferenceSession:
    """A session on PROVIDERS[label]; raises when ONNX Runtime quietly fell back to another provider."""
    providers = PROVIDERS[label]
    options: dict[str, dict[str, Any]] = {}
    if TRT in providers:
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
        options[TRT] = tensorrt_provider_options(contract, min_batch=1, opt_batch=64, max_batch=MAX_BATCH,
                                                 fp16=True, cache_dir=cache_dir)
    if CUDA in providers and cuda_options:
        options[CUDA] = cuda_options
    session = make_session(loaded.graph_bytes(contract.graph), threads=threads, provider_options=options,
                           choice=ProviderChoice(providers, label))
    if session.get_providers()[0] != providers[0]:
        raise RuntimeError(f"ONNX Runtime fell back to {session.get_providers()}")
    return session


# ---- 1. parity, 2. throughput ----------------------------------------------------------------------

def parity(reference: ort.InferenceSession, session: ort.InferenceSession, contract: GraphContract,
           tolerance: float, batch: int = PARITY_BATCH) -> dict[str, Any]:
    feeds = sample_inputs(contract, batch, np.random.default_rng(0))
    want, got = reference.run(None, feeds), session.run(None, feeds)
    diff = max(float(np.max(np.abs(w.astype(np.float64) - g.astype(np.float64)))) for w, g in zip(want, got))
    scale = max(1.0, max(float(np.max(np.abs(w))) for w in want))
    return {"batch": batch, "max_abs_diff": diff, "scaled": diff / scale, "tolerance": tolerance,
            "pass": bool(np.isfinite(diff) and diff / scale <= tolerance)}


def throughput(session: ort.InferenceSession, contract: GraphContract, batches: list[int],
               budget_s: float) -> dict[int, dict[str, float]]:
    rng, out = np.random.default_rng(1), {}
    for batch in batches:
        feeds = sample_inputs(contract, batch, rng)
        ms = time_call(lambda: session.run(None, feeds), min_runs=2, budget_s=budget_s)
        out[batch] = {"ms": round(ms, 4), "rows_per_s": round(batch / ms * 1e3, 1)}
    return out


def graphs_section(store: ModelStore, setup: Setup, mode: Mode, threads: int | None, cache_dir: Path,
                   log: Callable[[str], None]) -> tuple[list[dict], list[dict]]:
    parity_rows, throughput_rows = [], []
    for model in store.models():
        loaded = store.load(model)
        for contract in loaded.manifest.graphs:
            if mode.graphs is not None and contract.key not in mode.graphs:
                continue
            reference = open_session("cpu", loaded, contract, threads=threads)
            compared = {}  # label -> session; the fallback's "cpu" is a second, independent CPU session
            for label in setup.labels:
                try:
                    compared[label] = open_session(label, loaded, contract, threads=threads, cache_dir=cache_dir)
                except Exception as exc:  # noqa: BLE001 -- a provider that cannot open this graph is a finding
                    parity_rows.append({"graph": contract.key, "provider": label, "pass": False,
                                        "error": f"{type(exc).__name__}: {exc}"[:300]})
                    log(f"  {contract.key} on {label}: cannot open: {exc}")
                    continue
                tolerance = TOLERANCE.get(contract.key, DEFAULT_TOLERANCE)[label == "tensorrt-fp16"]
                row = {"graph": contract.key, "provider": label,
                       **parity(reference, compared[label], contract, tolerance)}
                parity_rows.append(row)
                log(f"  parity {contract.key} {label}: max abs diff {row['max_abs_diff']:.2e} "
                    f"(scaled {row['scaled']:.2e} <= {tolerance:g}: {'pass' if row['pass'] else 'FAIL'})")
            timed = {"cpu": reference, **{k: v for k, v in compared.items() if k != "cpu"}}  # fallback: CPU once
            for label, session in timed.items():
                for batch, cell in throughput(session, contract, mode.batches, mode.budget_s).items():
                    throughput_rows.append({"graph": contract.key, "provider": label, "batch": batch, **cell})
                log(f"  rows/s {contract.key} {label}: " + ", ".join(
                    f"{r['rows_per_s']:.0f} @{r['batch']}" for r in throughput_rows[-len(mode.batches):]))
    return parity_rows, throughput_rows


# ---- 3. the device step loop -----------------------------------------------------------------------

def requests_for(images: int, sampler: str, steps: int) -> list[DiffusionRequest]:
    """The bucket as engine requests of 2 images each (1 for a bucket of 1), classes and seeds varied."""
    n = min(2, images)
    return [DiffusionRequest(class_id=k % 10, sampler=sampler, steps=steps, guidance_scale=GUIDANCE,
                             seed=1000 + k, n=n) for k in range(images // n)]


def engine_images(runner: OnnxRunner, requests: list[DiffusionRequest]) -> torch.Tensor:
    """The step engine's CPU path, all requests in one batch: uint8 [B, 1, 28, 28] in request order."""
    engine = EngineCore(DiffusionStepper(runner), max_rows=sum(r.rows for r in requests))
    ids = [engine.add_request(r) for r in requests]
    done: dict[str, torch.Tensor] = {}
    while engine.has_work():
        done.update((o.request_id, o.result()) for o in engine.step())
    return torch.cat([done[i] for i in ids])


def device_loop_section(store: ModelStore, setup: Setup, mode: Mode, threads: int | None,
                        log: Callable[[str], None]) -> tuple[list[dict], dict[str, str]]:
    loaded = store.load("diffusion")
    contract = loaded.manifest.graph("denoise")
    device, on_cuda = setup.device, setup.device.type == "cuda"
    runner = OnnxRunner(open_session("cpu", loaded, contract, threads=threads), contract)
    notes: dict[str, str] = {}
    # One stream for torch and ONNX Runtime: the EP runs on torch's stream, so the maths and the forward are
    # ordered on the device with no synchronisation between them (and a captured graph is not on stream 0).
    stream = torch.cuda.Stream(device) if on_cuda else None
    cuda_options = {"has_user_compute_stream": "1", "user_compute_stream": str(stream.cuda_stream)} if on_cuda else None
    label = "cuda" if on_cuda else "cpu"
    session = open_session(label, loaded, contract, threads=threads, cuda_options=cuda_options)
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)

    def variants(rows: int):
        """(name, make the denoiser, skip it when this variant worked) in order."""
        yield "iobinding", lambda: BoundDenoiser(session, contract, rows, device), None
        yield "host-copies", lambda: HostDenoiser(session, contract, rows, device), None
        if not on_cuda:
            notes["cuda-graph"] = "needs the CUDA execution provider"
            return

        def graphed(shared_stream: bool) -> BoundDenoiser:  # one session per bucket: a graph has one shape
            options = {**(cuda_options if shared_stream else {}), "enable_cuda_graph": "1"}
            s = open_session("cuda", loaded, contract, threads=threads, cuda_options=options)
            return BoundDenoiser(s, contract, rows, device, own_stream=not shared_stream)
        yield "cuda-graph", lambda: graphed(True), None
        # in case ORT will not capture on a stream it was handed: its own, synchronised with torch's per step
        yield "cuda-graph-own-stream", lambda: graphed(False), "cuda-graph"

    rows_out = []
    with torch.cuda.stream(stream) if on_cuda else contextlib.nullcontext():
        for sampler in SAMPLERS:
            for images in mode.buckets:
                requests = requests_for(images, sampler, mode.steps)
                reference = engine_images(runner, requests)
                # x_T as the engine draws it for these requests (their seeds), then on the device once
                x_T = torch.cat([make_state(str(k), r, 0.0).x for k, r in enumerate(requests)]).to(device)
                y = torch.tensor([r.class_id for r in requests for _ in range(r.n)], device=device)
                worked = set()
                for variant, make, unless in variants(2 * images):
                    if unless in worked:
                        continue
                    try:
                        denoiser = make()
                        run = lambda: sample_on_device(denoiser, x_T, y, sampler=sampler, steps=mode.steps,  # noqa: E731
                                                       guidance_scale=GUIDANCE)
                        ms, x0 = _timed(run, sync, mode.repeats)
                    except Exception as exc:  # noqa: BLE001 -- e.g. ORT refusing a CUDA graph: a finding
                        notes[variant] = f"{type(exc).__name__}: {exc}"[:300]
                        log(f"  device loop {variant}: {notes[variant]}")
                        continue
                    worked.add(variant)
                    diff = (to_uint8(x0.cpu()).int() - reference.int()).abs()
                    row = {"sampler": sampler, "images": images, "rows": 2 * images, "steps": mode.steps,
                           "variant": variant, "provider": label, "device": str(device),
                           "ms_per_step": round(ms / mode.steps, 4), "images_per_s": round(images / ms * 1e3, 1),
                           "max_diff_levels": int(diff.max()), "mean_diff_levels": round(float(diff.float().mean()), 4)}
                    row["pass"] = row["max_diff_levels"] <= IMAGE_TOL and row["images_per_s"] > 0
                    rows_out.append(row)
                    log(f"  device loop {sampler} {images} images {variant} on {device}: {row['ms_per_step']:.3f} "
                        f"ms/step, {row['images_per_s']:.0f} images/s, max diff vs engine {row['max_diff_levels']}")
    return rows_out, notes


def _timed(run: Callable[[], torch.Tensor], sync: Callable[[], None], repeats: int) -> tuple[float, torch.Tensor]:
    """Median ms of whole runs after one warm-up run (which also lets ORT capture its CUDA graph)."""
    run()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = run()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


# ---- report ----------------------------------------------------------------------------------------

def environment(setup: Setup, threads: int | None) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {"date": datetime.date.today().isoformat(), "machine": machine_info().to_dict(), "threads": threads,
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "onnxruntime_providers": ort.get_available_providers(), "serving_would_use": choose_providers().providers,
            "fallback": setup.fallback, "device": str(setup.device), "compared": setup.labels,
            "unavailable": setup.unavailable}


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = ["# GPU path: provider parity, throughput, the device step loop", ""]
    if env["fallback"]:
        lines += [f"> **CPU FALLBACK: not GPU figures.** {env['unavailable']['cuda']}, so every number below ran "
                  "on CPUExecutionProvider (parity is CPU vs a second CPU session, the device loop runs on "
                  "device 'cpu'). It proves the code path, nothing about a GPU.", ""]
    lines += [f"{env['date']}, {env['gpu'] or env['machine']['cpu']} (x{env['machine']['cpu_count']} CPUs, load "
              f"{env['machine']['load_average']}); onnxruntime {env['machine']['onnxruntime']} offering "
              f"{', '.join(env['onnxruntime_providers'])}; torch {env['torch']} (CUDA {env['torch_cuda']}); "
              f"mode {result['mode']}.", ""]
    for label, why in env["unavailable"].items():
        lines.append(f"- {label}: not run: {why}")
    lines += ["", "## Parity against the CPU provider (fp32), batch 8", "",
              "| graph | provider | max abs diff | scaled | tolerance | result |", "|---|---|---:|---:|---:|---|"]
    for r in result["parity"]:
        if "error" in r:
            lines.append(f"| {r['graph']} | {r['provider']} | | | | FAIL: {r['error']} |")
        else:
            lines.append(f"| {r['graph']} | {r['provider']} | {r['max_abs_diff']:.2e} | {r['scaled']:.2e} | "
                         f"{r['tolerance']:g} | {'pass' if r['pass'] else 'FAIL'} |")
    labels = list(dict.fromkeys(r["provider"] for r in result["throughput"]))
    lines += ["", "## Throughput: rows/s (session.run, host inputs and outputs)", "",
              "| graph | batch | " + " | ".join(labels) + " |", "|---|---:|" + "---:|" * len(labels)]
    cells = {(r["graph"], r["batch"], r["provider"]): r["rows_per_s"] for r in result["throughput"]}
    for graph, batch in dict.fromkeys((r["graph"], r["batch"]) for r in result["throughput"]):
        lines.append(f"| {graph} | {batch} | " + " | ".join(
            f"{cells[(graph, batch, p)]:,.0f}" if (graph, batch, p) in cells else "" for p in labels) + " |")
    lines += ["", f"## Device step loop: diffusion.denoise, guidance {GUIDANCE}, vs the step engine's CPU path", "",
              "| sampler | images (rows) | steps | variant | device | ms/step | images/s "
              "| max / mean diff vs engine (levels) | result |",
              "|---|---:|---:|---|---|---:|---:|---|---|"]
    for r in result["device_loop"]:
        lines.append(f"| {r['sampler']} | {r['images']} ({r['rows']}) | {r['steps']} | {r['variant']} | {r['device']} "
                     "| "
                     f"{r['ms_per_step']:.3f} | {r['images_per_s']:,.0f} | {r['max_diff_levels']} / "
                     f"{r['mean_diff_levels']:.3f} | {'pass' if r['pass'] else 'FAIL'} |")
    for variant, why in result["device_loop_notes"].items():
        lines.append(f"\n- {variant}: {why}")
    lines += ["", f"**{'All checks passed' if result['passed'] else 'Some checks FAILED'}.**", ""]
    return "\n".join(lines)


def run(store: ModelStore, out: Path, mode: Mode, *, threads: int | None = None, quick: bool = False,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    setup = detect(log)
    log(("CPU FALLBACK: " + setup.unavailable["cuda"] + "; everything runs on CPUExecutionProvider, not GPU figures")
        if setup.fallback else f"GPU: {torch.cuda.get_device_name(0)}; comparing {', '.join(setup.labels)} with CPU")
    result: dict[str, Any] = {"mode": "quick" if quick else "full", "environment": environment(setup, threads)}
    log("1-2. parity and throughput")
    result["parity"], result["throughput"] = graphs_section(store, setup, mode, threads, TRT_CACHE, log)
    log("3. device step loop")
    result["device_loop"], result["device_loop_notes"] = device_loop_section(store, setup, mode, threads, log)
    ran = {(r["sampler"], r["images"], r["variant"]) for r in result["device_loop"]}
    required = {(s, b, v) for s in SAMPLERS for b in mode.buckets for v in ("iobinding", "host-copies")}
    result["passed"] = (all(r["pass"] for r in result["parity"]) and all(r["pass"] for r in result["device_loop"])
                        and required <= ran  # a CUDA graph may be refused (a note); these two may not
                        and all(r["rows_per_s"] > 0 for r in result["throughput"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gpu.md").write_text(markdown(result))
    log(f"wrote {out / 'gpu.md'} and gpu.json: {'all checks passed' if result['passed'] else 'some checks FAILED'}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None, help="model store (default: $GENSERVE_STORE, else ./model_store_data)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help=f"graphs {', '.join(QUICK.graphs)}, batches "
                        f"{QUICK.batches}, bucket {QUICK.buckets}, {QUICK.steps} steps: seconds, for tests")
    parser.add_argument("--graphs", nargs="+", default=None, help="only these graphs (family.graph)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime CPU threads (default: all cores)")
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else FULL
    if args.graphs:
        mode = dataclasses.replace(mode, graphs=tuple(args.graphs))
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(ModelStore.open(args.store), args.out, mode, threads=args.threads or os.cpu_count(), quick=args.quick)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
