"""ONNX Runtime sessions and the choice of execution provider: TensorRT -> CUDA -> CPU, by what the
machine has. Imports only onnxruntime, so serving can use it without torch code."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import onnxruntime as ort

from core.contracts import GraphContract

PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


@dataclass
class ProviderChoice:
    providers: list[str]          # in priority order, as passed to InferenceSession
    reason: str                   # one line a human can read in logs and `genserve bench`


def gpu_present() -> bool:
    """An NVIDIA GPU visible to this process. ORT lists GPU providers whenever its build has them, even on a
    machine with no GPU (they then fail at session creation), so the listing alone is not enough."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists()


def choose_providers(available: Sequence[str] | None = None, has_gpu: bool | None = None) -> ProviderChoice:
    """TensorRT first (fastest where it builds), then CUDA, CPU always last as the fallback for unsupported
    nodes. Arguments default to this machine; tests pass them to cover machines we are not on."""
    available = list(ort.get_available_providers() if available is None else available)
    has_gpu = gpu_present() if has_gpu is None else has_gpu
    gpu_eps = [p for p in PREFERENCE[:2] if p in available]
    if gpu_eps and has_gpu:
        chosen = gpu_eps + ["CPUExecutionProvider"]
        return ProviderChoice(chosen, f"GPU found; onnxruntime offers {', '.join(gpu_eps)}")
    if gpu_eps:
        why = f"onnxruntime offers {', '.join(gpu_eps)} but no NVIDIA GPU is visible"
    elif has_gpu:
        why = "a GPU is visible but this onnxruntime build has no TensorRT or CUDA provider (install onnxruntime-gpu)"
    else:
        why = f"no GPU and onnxruntime offers only {', '.join(available) or 'nothing'}"
    return ProviderChoice(["CPUExecutionProvider"], f"CPU: {why}")


def tensorrt_provider_options(contract: GraphContract, *, min_batch: int = 1, opt_batch: int = 16,
                              max_batch: int = 64, fp16: bool = False, cache_dir: Path | None = None) -> dict[str, Any]:
    """TensorRT EP options with one optimization profile over the dynamic batch axis (the EP's
    trt_profile_*_shapes syntax: "name:1x64,y:1")."""
    def shapes(b: int) -> str:
        return ",".join(f"{t.name}:" + "x".join(str(d) for d in t.concrete_shape(b)) for t in contract.inputs)

    options: dict[str, Any] = {"trt_fp16_enable": fp16, "trt_profile_min_shapes": shapes(min_batch),
                               "trt_profile_opt_shapes": shapes(opt_batch), "trt_profile_max_shapes": shapes(max_batch)}
    if cache_dir is not None:  # engine builds take seconds to minutes: cache them across restarts
        options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir))
    return options


def session_options(threads: int | None = None,
                    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only: ORT warns about every unused initializer otherwise
    return so


def external_data(model: bytes) -> list[tuple[str, str]]:
    """(tensor name, location) of every tensor in the serialized graph whose data lives in another file."""
    import onnx

    proto = onnx.ModelProto.FromString(model)
    found: list[tuple[str, str]] = []

    def tensors(graph) -> None:
        for t in graph.initializer:
            visit(t)
        for node in graph.node:
            for a in node.attribute:
                for t in ([a.t] if a.HasField("t") else []) + list(a.tensors):
                    visit(t)
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    tensors(g)

    def visit(t) -> None:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            found.append((t.name, {e.key: e.value for e in t.external_data}.get("location", "")))

    tensors(proto.graph)
    return found


def check_self_contained(model: bytes) -> None:
    """Refuse a graph that reads tensors from other files. genserve opens graphs from the bytes the model
    store verified, so an external file is data no manifest hash covers, and a location like
    `../../x` or `/etc/x` would make ONNX Runtime read outside the version folder. ValueError names it."""
    if refs := external_data(model):
        name, location = refs[0]
        escapes = Path(location).is_absolute() or ".." in Path(location).parts
        raise ValueError(f"the graph reads tensor {name!r} from external file {location!r}"
                         f"{', outside its version folder' if escapes else ''} ({len(refs)} external tensor(s)); "
                         "genserve serves self-contained graphs only, from their verified bytes")


def make_session(model: Path | bytes, *, threads: int | None = None, choice: ProviderChoice | None = None,
                 provider_options: dict[str, dict[str, Any]] | None = None,
                 level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> ort.InferenceSession:
    """A session on the chosen providers; model is a path or the verified bytes from the model store (which
    must be self-contained: check_self_contained)."""
    if isinstance(model, bytes):
        check_self_contained(model)
    choice = choice or choose_providers()
    opts = provider_options or {}
    providers = [(p, opts[p]) if p in opts else p for p in choice.providers]
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, sess_options=session_options(threads, level), providers=providers)
