"""TensorRT engines from the exported ONNX graphs, one optimization profile over the batch axis.

Only ever runs where `tensorrt` imports and an NVIDIA GPU is visible; anywhere else every entry point
raises TensorRTUnavailable with the reason, and nothing is faked. Written against the TensorRT 10/11
Python API (name-based tensors, execute_async_v3, build_serialized_network). TensorRT 11 removed
BuilderFlag.FP16 (networks are always strongly typed), so FP16 there means building from an ONNX graph
already converted to mixed precision; see _fp16_onnx.
"""
from __future__ import annotations

import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from core.contracts import GraphContract
from core.runtime import gpu_present

WORKSPACE_BYTES = 1 << 30   # these models need far less; capping it keeps builds polite on shared GPUs


class TensorRTUnavailable(RuntimeError):
    """This machine cannot build or run TensorRT engines; the message says why."""


@dataclass(frozen=True)
class BatchProfile:
    """The batch sizes one engine serves: TensorRT tunes kernels for `opt` and accepts [min, max]."""

    min: int = 1
    opt: int = 16
    max: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"need 1 <= min <= opt <= max, got {self.min}, {self.opt}, {self.max}")


@dataclass
class EngineBuild:
    path: Path
    contract: str               # family.graph
    fp16: bool
    profile: BatchProfile
    build_seconds: float
    tensorrt: str               # TensorRT version
    gpu: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = self.path.name
        return d


def unavailable_reason() -> str | None:
    """None when engines can be built here, else a one-line reason."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        return f"the tensorrt Python package is not installed ({exc})"
    if not gpu_present():
        return "no NVIDIA GPU is visible to this process"
    major = int(trt.__version__.split(".")[0])
    if major < 10:
        return f"TensorRT {trt.__version__} is too old: the name-based tensor API needs TensorRT >= 10"
    return None


def _require():
    reason = unavailable_reason()
    if reason:
        raise TensorRTUnavailable(f"TensorRT path skipped: {reason}")
    import tensorrt as trt
    return trt


def _gpu_name() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown NVIDIA GPU"


def _fp16_onnx(onnx_path: Path) -> bytes:
    """An FP16 mixed-precision copy of the graph with fp32 inputs/outputs, for strongly typed builds.
    ModelOpt AutoCast is NVIDIA's recommended converter; onnxconverter-common's is the lighter fallback."""
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
        return convert_to_mixed_precision(onnx_path=str(onnx_path), low_precision_type="fp16",
                                          keep_io_types=True).SerializeToString()
    except ImportError:
        pass
    try:
        import onnx
        from onnxconverter_common import float16
    except ImportError as exc:
        raise TensorRTUnavailable("FP16 on TensorRT >= 11 needs an FP16 ONNX graph: pip install nvidia-modelopt "
                                  f"or onnxconverter-common ({exc})") from exc
    return float16.convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True).SerializeToString()


def build_engine(onnx_path: Path, engine_path: Path, contract: GraphContract, *,
                 profile: BatchProfile = BatchProfile(), fp16: bool = False,
                 workspace_bytes: int = WORKSPACE_BYTES) -> EngineBuild:
    """Parse the ONNX graph, add one optimization profile over the batch axis of every input, build and
    serialize the engine to engine_path."""
    trt = _require()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode since TensorRT 10
    parser = trt.OnnxParser(network, logger)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)

    data = onnx_path.read_bytes()
    if fp16:
        if hasattr(trt.BuilderFlag, "FP16"):     # TensorRT 10: weakly typed, the builder picks fp16 kernels
            config.set_flag(trt.BuilderFlag.FP16)
        else:                                   # TensorRT 11: precision lives in the graph
            data = _fp16_onnx(onnx_path)
    if not parser.parse(data):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")

    opt_profile = builder.create_optimization_profile()
    for spec in contract.inputs:
        opt_profile.set_shape(spec.name, spec.concrete_shape(profile.min), spec.concrete_shape(profile.opt),
                              spec.concrete_shape(profile.max))
    config.add_optimization_profile(opt_profile)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {contract.key} (see the log above)")
    engine_path.write_bytes(bytes(serialized))
    return EngineBuild(engine_path, contract.key, fp16, profile, round(time.perf_counter() - t0, 2),
                       trt.__version__, _gpu_name())


def time_engine(engine_path: Path, contract: GraphContract, batches: Sequence[int], *,
                iters: int = 50) -> dict[int, float]:
    """Milliseconds per forward at each batch size, device buffers allocated with torch CUDA tensors and
    timed on one CUDA stream with events (host-to-device copies excluded, as in serving's steady state)."""
    trt = _require()
    import numpy as np
    import torch

    from core.contracts import sample_inputs

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("timing engines needs a CUDA build of torch for device buffers")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise RuntimeError(f"could not deserialize {engine_path} (built for another TensorRT or GPU?)")
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()
    rng = np.random.default_rng(0)
    result: dict[int, float] = {}
    def engine_dtype(name: str) -> np.dtype:  # the engine's own I/O dtype (the parser may narrow int64)
        return np.dtype(trt.nptype(engine.get_tensor_dtype(name)))

    for batch in batches:
        buffers = {name: torch.from_numpy(array.astype(engine_dtype(name))).cuda()
                   for name, array in sample_inputs(contract, batch, rng).items()}
        for name, buf in buffers.items():
            context.set_input_shape(name, tuple(buf.shape))
        for spec in contract.outputs:
            dtype = torch.from_numpy(np.empty(0, engine_dtype(spec.name))).dtype
            buffers[spec.name] = torch.empty(spec.concrete_shape(batch), dtype=dtype, device="cuda")
        for name, buf in buffers.items():
            context.set_tensor_address(name, buf.data_ptr())
        torch.cuda.synchronize()  # buffers were filled on the default stream
        for _ in range(5):  # warm-up: first runs pay lazy initialisation
            context.execute_async_v3(stream.cuda_stream)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(iters):
            context.execute_async_v3(stream.cuda_stream)
        end.record(stream)
        end.synchronize()
        result[batch] = start.elapsed_time(end) / iters
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m exporters.tensorrt`: build and time engines for the store's latest versions (a GPU-machine
    check; engines are not published, as they are tied to one GPU model and TensorRT version)."""
    import argparse
    import datetime

    from model_store import ModelStore

    parser = argparse.ArgumentParser(prog="python -m exporters.tensorrt", description=main.__doc__)
    parser.add_argument("--store", default=None, help="model store (default: $GENSERVE_STORE, else ./model_store_data)")
    parser.add_argument("--models", nargs="*", default=None, help="default: every model in the store")
    parser.add_argument("--out", type=Path, default=Path("build/tensorrt"), help="where engines are written")
    parser.add_argument("--fp16", action="store_true", help="also build and time FP16 engines")
    parser.add_argument("--max-batch", type=int, default=64)
    args = parser.parse_args(argv)

    reason = unavailable_reason()
    if reason:
        print(f"TensorRT path skipped: {reason}")
        return 0
    store = ModelStore.open(args.store)
    profile = BatchProfile(1, min(16, args.max_batch), args.max_batch)
    print(f"{datetime.date.today()} {_gpu_name()} TensorRT {_require().__version__}, profile {profile}")
    print("| graph | precision | build s | ms @1 | ms @opt | ms @max |\n|---|---|---:|---:|---:|---:|")
    for model in args.models or store.models():
        loaded = store.load(model)
        folder = args.out / model / loaded.manifest.version
        folder.mkdir(parents=True, exist_ok=True)
        for contract in loaded.manifest.graphs:
            onnx_path = folder / contract.onnx_file
            onnx_path.write_bytes(loaded.graph_bytes(contract.graph))
            for fp16 in (False, True) if args.fp16 else (False,):
                built = build_engine(onnx_path, folder / f"{contract.graph}{'.fp16' if fp16 else ''}.plan", contract,
                                     profile=profile, fp16=fp16)
                ms = time_engine(built.path, contract, [profile.min, profile.opt, profile.max])
                print(f"| {model}.{contract.graph} | {'fp16' if fp16 else 'fp32'} | {built.build_seconds:.1f} | "
                      + " | ".join(f"{ms[b]:.3f}" for b in (profile.min, profile.opt, profile.max)) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
