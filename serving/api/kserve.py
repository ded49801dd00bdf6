"""KServe v2 / Open Inference Protocol: the half HTTP (kserve_http.py) and gRPC (kserve_grpc.py) share. Each
transport only moves bytes: it decodes its tensors with `decode_input`, and answers with the dicts (KServe's
and Triton's JSON shapes) and InferResult that `OpenInference` returns; gRPC converts those dicts to its
messages field for field. No Ray import: the model deployments are reached through the ingress.

Every served model, and `auto`, is a v2 model:

    inputs   class_id  INT64 [-1]         0..9, 10 = no class; one image per element (1..16)
             seed      INT64 [-1]         optional, one per image: image i depends only on class_id[i],
                                          seed[i] and the parameters. Absent: the server draws S, image i
                                          uses S + i, and the response's parameter `seed` is S.
    outputs  image     UINT8 [-1,28,28]
    request parameters: sampler, steps, guidance_scale (diffusion), latency_slo_ms, the policy's hints
             (quality, goal, best_effort, max_fd, min_class_accuracy, cascade, cascade_threshold) and
             Triton's timeout (microseconds, 0 = none); the tighter of latency_slo_ms and timeout is the
             request's deadline.
    response parameters: family, the settings, `policy` (JSON) and, for a cascade, `cascade` (JSON: which
             stage served each image, its judge score and why; serving/api/cascade.py)

Errors are serving.api.errors.APIError (status + message), which each transport renders in its own shape;
the checks shared with the other APIs are serving.api.validation's.
"""
from __future__ import annotations

import asyncio
import math
import secrets
import time
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import version as package_version
from typing import Any, AsyncIterator

import numpy as np

from core.checks import is_int
from core.contracts import IMAGE_SHAPE, NULL_CLASS
from serving.api.errors import invalid, model_not_found
from serving.api.jobs import GenerationJob, GenerationPreview, GenerationResult, ModelInfo, PolicyHints
from serving.api.validation import (AUTO, MAX_N, MAX_TIMEOUT_US, POLICY_HINTS, SAMPLING_EXTRAS, check_class_id,
                                    check_seed, policy_hints, resolve_model, sampling_options)
from serving.errors import ModelUnavailable

SERVER_NAME = "genserve"
PLATFORM = "genserve"        # a v2 model here is a genserve sampling path, not one graph
BACKEND = "onnxruntime"      # what runs every graph
# Only what is implemented: binary tensors (HTTP), request/response parameters, Triton's /config and /stats
EXTENSIONS = ("binary_tensor_data", "parameters", "model_configuration", "statistics")
READY_TIMEOUT_S = 5.0        # a model deployment that does not answer info() within this is not ready


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str            # the v2 name: INT64, UINT8, ...
    shape: tuple[int, ...]   # -1: any size
    optional: bool = False


CLASS_ID, SEED, IMAGE = "class_id", "seed", "image"
INPUTS = {CLASS_ID: TensorSpec(CLASS_ID, "INT64", (-1,)), SEED: TensorSpec(SEED, "INT64", (-1,), optional=True)}
OUTPUTS = {IMAGE: TensorSpec(IMAGE, "UINT8", (-1, *IMAGE_SHAPE[1:]))}
PARAMETERS = (*SAMPLING_EXTRAS, "latency_slo_ms", "timeout", *POLICY_HINTS)
_BYTES = {"INT64": 8}        # bytes per element of the input datatypes


# ---- request decoding ------------------------------------------------------------------------------------

def decode_input(name: Any, datatype: Any, shape: Any, data: Any) -> tuple[str, list[int]]:
    """One input tensor, as (name, flat values). `data` is raw little-endian bytes (HTTP's binary extension,
    gRPC's raw_input_contents) or a list of numbers, possibly nested (JSON `data`, gRPC typed contents)."""
    spec = INPUTS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise invalid(None, f"unknown input {name!r}; inputs: {_tensor_list(INPUTS)}")
    if datatype != spec.datatype:
        raise invalid(None, f"input {name!r} must be {spec.datatype}, got {datatype!r}")
    if (not isinstance(shape, (list, tuple)) or len(shape) != 1 or not is_int(shape[0])
            or not 1 <= shape[0] <= MAX_N):
        raise invalid(None, f"input {name!r} must have shape [n] with 1 <= n <= {MAX_N} (one element per image), "
                            f"got {list(shape) if isinstance(shape, (list, tuple)) else shape!r}")
    n = int(shape[0])
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) != n * _BYTES[datatype]:
            raise invalid(None, f"input {name!r}: shape {[n]} {datatype} takes {n * _BYTES[datatype]} bytes, "
                                f"got {len(data)}")
        return name, np.frombuffer(data, "<i8").tolist()
    values = list(_flatten(data)) if isinstance(data, (list, tuple)) else None
    if values is None or not all(is_int(v) and -2**63 <= v < 2**63 for v in values):
        raise invalid(None, f"input {name!r}: data must be a list of {datatype} integers")
    if len(values) != n:
        raise invalid(None, f"input {name!r}: shape {[n]} needs {n} values, got {len(values)}")
    return name, values


@dataclass(frozen=True)
class InferRequest:
    """A validated v2 inference request."""

    name: str                          # the model as asked for: a served model or "auto"
    model: str                         # a served model, or "auto": the policy chooses
    version: str                       # "": whatever version is served
    id: str                            # echoed in the response
    jobs: tuple[GenerationJob, ...]    # one job of n images with per-image seeds; a job per image for a PixelCNN
    drawn_seed: int | None             # the seed of image 0 when the request gave none (image i: drawn_seed + i)
    hints: PolicyHints                 # quality (tier), goal, best_effort, max_fd, min_class_accuracy


def parse_infer(name: str, version: str, request_id: str, inputs: list[tuple[str, list[int]]],
                parameters: dict[str, Any], outputs: list[str], families: dict[str, str]) -> InferRequest:
    """Check a decoded request against the served models (name -> family). Raises APIError: 404 for an
    unknown model, 400 for anything else wrong, with a message naming the input or parameter. The version is
    checked against the served one by OpenInference.infer."""
    model = resolve_model(name, families)
    tensors = dict(inputs)
    if len(tensors) != len(inputs):
        raise invalid(None, "each input may appear once")
    if CLASS_ID not in tensors:
        raise invalid(None, f"input {CLASS_ID!r} is required; inputs: {_tensor_list(INPUTS)}")
    for output in outputs:
        if not isinstance(output, str) or output not in OUTPUTS:
            raise invalid(None, f"unknown output {output!r}; outputs: {_tensor_list(OUTPUTS)}")
    if unknown := sorted(set(parameters) - set(PARAMETERS)):
        raise invalid(None, f"unknown parameter {unknown[0]!r}; parameters: {', '.join(PARAMETERS)}")

    class_ids = [check_class_id(c) for c in tensors[CLASS_ID]]
    seeds, drawn = tensors.get(SEED), None
    if seeds is None:
        drawn = secrets.randbits(32)  # reported in the response, so every image can be made again
        seeds = [drawn + i for i in range(len(class_ids))]
    elif len(seeds) != len(class_ids):
        raise invalid(None, f"input {SEED!r} must have the shape of {CLASS_ID!r}: one seed per image, "
                            f"got {len(seeds)} for {len(class_ids)}")
    options = sampling_options(parameters, model, families.get(model))
    timeout_us = parameters.get("timeout")
    if timeout_us is not None and (not is_int(timeout_us) or not 0 <= timeout_us <= MAX_TIMEOUT_US):
        raise invalid(None, f"timeout (microseconds, 0 = none) must be an integer in [0, {MAX_TIMEOUT_US}], "
                            f"got {timeout_us!r}")
    if timeout_us:
        options["timeout_s"] = min(timeout_us / 1e6, options["timeout_s"] or math.inf)
    hints = policy_hints(parameters)  # its messages name the parameter, as v2's {"error": message} needs
    seeds = [check_seed(s) for s in seeds]
    # one job, each image from its own seed and class (a single one where they are all the same)
    jobs = (GenerationJob(class_id=next((c for c in class_ids if c != NULL_CLASS), NULL_CLASS), n=len(seeds),
                          seed=seeds[0], seeds=tuple(seeds) if len(seeds) > 1 else None,
                          class_ids=tuple(class_ids) if len(set(class_ids)) > 1 else None, **options),)
    return InferRequest(name, model, version, request_id, jobs, drawn, hints)


# ---- the protocol's operations -----------------------------------------------------------------------------

@dataclass(frozen=True)
class InferResult:
    name: str                 # the model that generated (a request for auto learns which)
    version: str
    id: str
    images: np.ndarray        # uint8 [n, 28, 28]
    parameters: dict          # family, the sampling settings used, and the drawn seed if any


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclass
class ModelStats:
    """Triton's per-model statistics, of the v2 requests this ingress replica served."""

    success: Duration = field(default_factory=Duration)   # end to end at the ingress
    fail: Duration = field(default_factory=Duration)
    compute: Duration = field(default_factory=Duration)   # at the model's replica
    inference_count: int = 0                              # images
    execution_count: int = 0                              # requests
    last_inference_ms: int = 0                            # ms since the epoch


class OpenInference:
    """The v2 operations over the ingress's models; one per Ingress replica (it keeps the statistics).
    `ingress` gives models (name -> handle), families and generate()."""

    def __init__(self, ingress):
        self.ingress = ingress
        self.stats: dict[str, ModelStats] = defaultdict(ModelStats)

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": package_version("genserve"), "extensions": list(EXTENSIONS)}

    async def server_ready(self) -> bool:
        return not await self.not_ready()

    async def not_ready(self) -> dict[str, str]:
        """Every served model that is not ready, and why: its replica failed to load it (ModelUnavailable's
        reason: a tampered artifact, say), or did not answer info() within READY_TIMEOUT_S (starting,
        failing or gone). Empty: the server is ready."""
        async def why(handle) -> str | None:
            try:
                await asyncio.wait_for(handle.info.remote(), READY_TIMEOUT_S)
                return None
            except ModelUnavailable as exc:  # Ray's RayTaskError is also the replica's exception's class
                return str(getattr(exc, "cause", None) or exc)
            except TimeoutError:
                return f"its replica did not answer within {READY_TIMEOUT_S:g} s"
            except Exception as exc:  # a replica that is starting, failing or gone: not ready, and not an error
                return f"its replica did not answer ({type(exc).__name__})"

        names = list(self.ingress.models)
        reasons = await asyncio.gather(*(why(self.ingress.models[n]) for n in names))
        return {name: reason for name, reason in zip(names, reasons) if reason is not None}

    async def model_ready(self, name: str, version: str) -> bool:
        model = self._model(name)
        try:
            info = await asyncio.wait_for(self.ingress.models[model].info.remote(), READY_TIMEOUT_S)
        except Exception:
            return False
        self._check_version(name, version, info)
        return True

    async def model_metadata(self, name: str, version: str) -> dict[str, Any]:
        info = await self._info(name, version)
        return {"name": name, "versions": [] if name == AUTO else [info.version], "platform": PLATFORM,
                "inputs": [_tensor_metadata(t) for t in INPUTS.values()],
                "outputs": [_tensor_metadata(t) for t in OUTPUTS.values()]}

    async def model_config(self, name: str, version: str) -> dict[str, Any]:
        """Triton's model configuration. max_batch_size 0: the dims are the full shapes (images per request
        are the length of class_id, up to MAX_N; batching across requests happens in the deployments)."""
        await self._info(name, version)
        return {"name": name, "platform": PLATFORM, "backend": BACKEND, "max_batch_size": 0,
                "input": [{"name": t.name, "data_type": f"TYPE_{t.datatype}", "dims": list(t.shape),
                           "optional": t.optional} for t in INPUTS.values()],
                "output": [{"name": t.name, "data_type": f"TYPE_{t.datatype}", "dims": list(t.shape)}
                           for t in OUTPUTS.values()]}

    async def model_statistics(self, name: str, version: str) -> dict[str, Any]:
        """Triton's statistics of one model ("" = every model). `auto`'s requests count under the model that
        served them."""
        if name:
            infos = [await self._info(name, version)]
        else:
            infos = await asyncio.gather(*(h.info.remote() for h in self.ingress.models.values()))
        return {"model_stats": [_statistics(info, self.stats[info.name]) for info in infos]}

    async def infer(self, req: InferRequest) -> InferResult:
        if req.version:
            await self._info(req.name, req.version)
        start = time.perf_counter_ns()
        try:
            results = await self.ingress.generate(req.model, list(req.jobs), req.hints)
        except BaseException:
            self.stats[req.model if req.model != AUTO else self._model(AUTO)].fail.add(time.perf_counter_ns() - start)
            raise
        return self._finish(req, results, start)

    async def infer_stream(self, req: InferRequest) -> AsyncIterator[GenerationPreview | InferResult]:
        """infer's streamed form (gRPC's ModelStreamInfer): the request's partial images as its jobs make them
        (preview i once every job has made its own, their images in job order), then its InferResult, counted
        in the statistics as infer's. Closing it cancels the model calls."""
        if req.version:
            await self._info(req.name, req.version)
        start = time.perf_counter_ns()
        previews: dict[int, dict[int, GenerationPreview]] = defaultdict(dict)   # index -> job -> preview
        results: dict[int, GenerationResult] = {}
        events = self.ingress.generate_stream(req.model, list(req.jobs), req.hints)
        try:
            async for job, event in events:
                if isinstance(event, GenerationResult):
                    results[job] = event
                    continue
                taken = previews[event.index]
                taken[job] = event
                if len(taken) == len(req.jobs):
                    yield replace(event, images=np.concatenate([taken[j].images for j in sorted(taken)]))
        except BaseException:  # refused, failed, or closed by the client
            self.stats[req.model if req.model != AUTO else self._model(AUTO)].fail.add(time.perf_counter_ns() - start)
            raise
        finally:
            await events.aclose()
        yield self._finish(req, [results[j] for j in range(len(req.jobs))], start)

    def _finish(self, req: InferRequest, results: list[GenerationResult], start_ns: int) -> InferResult:
        """A served request's statistics, and its InferResult from its jobs' results."""
        stats = self.stats[results[0].model]  # auto's requests count under the model that served them
        stats.success.add(time.perf_counter_ns() - start_ns)
        stats.compute.add(int(max(r.replica_ms for r in results) * 1e6))  # the jobs ran concurrently
        stats.inference_count += sum(len(r.images) for r in results)
        stats.execution_count += 1
        stats.last_inference_ms = int(time.time() * 1000)
        first = results[0]
        parameters = {"family": first.family, **first.settings.to_dict(), **({"policy": json.dumps(first.policy)}
                                                                    if first.policy else {})}
        if first.policy and "cascade" in first.policy:
            parameters["cascade"] = json.dumps(first.policy["cascade"])
        if req.drawn_seed is not None:
            parameters["seed"] = req.drawn_seed
        return InferResult(first.model, first.version, req.id, np.concatenate([r.images for r in results]),
                           parameters)

    def _model(self, name: str) -> str:
        """The served model a name's metadata comes from: auto describes itself by the first served model
        (every model has the same v2 tensors)."""
        model = resolve_model(name, self.ingress.families)
        return next(iter(self.ingress.models)) if model == AUTO else model

    async def _info(self, name: str, version: str) -> ModelInfo:
        info = await self.ingress.models[self._model(name)].info.remote()
        self._check_version(name, version, info)
        return info

    @staticmethod
    def _check_version(name: str, version: str, info: ModelInfo) -> None:
        if version and name == AUTO:
            raise model_not_found(f"model {AUTO!r} has no versions: it routes to a served model")
        if version and version != info.version:
            raise model_not_found(f"model {name!r} has no version {version!r}; it serves version {info.version!r}")


def _statistics(info: ModelInfo, s: ModelStats) -> dict[str, Any]:
    """Triton's ModelStatistics; what genserve does not measure (queue, input/output conversion) is zero."""
    zero = asdict(Duration())
    return {"name": info.name, "version": info.version, "last_inference": s.last_inference_ms,
            "inference_count": s.inference_count, "execution_count": s.execution_count,
            "inference_stats": {"success": asdict(s.success), "fail": asdict(s.fail), "queue": zero,
                                "compute_input": zero, "compute_infer": asdict(s.compute),
                                "compute_output": zero, "cache_hit": zero, "cache_miss": zero},
            "batch_stats": []}


def _tensor_metadata(t: TensorSpec) -> dict[str, Any]:
    return {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}


def _tensor_list(specs: dict[str, TensorSpec]) -> str:
    return ", ".join(f"{t.name} {t.datatype} {list(t.shape)}{' (optional)' if t.optional else ''}"
                     for t in specs.values())


def _flatten(data: list | tuple):
    for v in data:
        if isinstance(v, (list, tuple)):
            yield from _flatten(v)
        else:
            yield v
