"""The families' own operations over HTTP, translated to and from the internal jobs (serving.api.jobs).
Pure: no Ray, no runtime, so every message is tested without a server.

    POST /v1/images/interpolations   {model, seeds: [a, b] | images: [a, b], frames, prompt | class_id}   vae
    POST /v1/images/reconstructions  {model, images: [...], prompt | class_id}                            vae
    POST /v1/likelihood              {model, images: [...], prompt | class_id, seed}                      flow, pixelcnn

`model` absent or "auto" is the first served model (in the Serve config's order) that has the operation.
An image is a base64 PNG, 28x28 8-bit grayscale (a `data:image/png;base64,` URL too), or 28 rows of 28
integers 0..255. The class conditions the model; absent, the unconditional model (class id 10) is used,
which is what an anomaly detector wants; the class follows the same rule as generations
(validation.class_of). Errors are OpenAI's shape, as the rest of the HTTP API.
"""
from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.contracts import NULL_CLASS
from serving.api.classes import CLASS_NAMES
from serving.api.errors import invalid, model_not_found
from serving.api.jobs import (GenerationResult, ImagesJob, InterpolationJob, LikelihoodResult,
                              ReconstructionResult)
from serving.api.png import encode_png
from serving.api.validation import (AUTO, DEFAULT_FRAMES, MAX_SEED_TEXT, check_body, check_frames, check_images,
                                    check_model, check_seed, class_of, is_seed)
from serving.operations import FAMILY_OPERATIONS, complexity_bits_per_dim


@dataclass(frozen=True)
class OperationRequest:
    """A validated request for one of the operations."""

    model: str                              # a served model whose family has the operation
    method: str                             # the deployment method: interpolate | reconstruct | log_likelihood
    job: InterpolationJob | ImagesJob

    @property
    def class_name(self) -> str | None:
        return None if self.job.class_id == NULL_CLASS else CLASS_NAMES[self.job.class_id]


def parse_interpolation(body: Any, families: dict[str, str]) -> OperationRequest:
    """POST /v1/images/interpolations: exactly one of `seeds` (two integers) or `images` (two images)."""
    body = check_body(body, {"model", "seeds", "images", "frames", "prompt", "class_id"})
    model = resolve_model(body.get("model"), families, "interpolate")
    frames = check_frames(body.get("frames", DEFAULT_FRAMES))
    seeds, images = body.get("seeds"), body.get("images")
    if seeds is None and images is None:
        raise invalid("seeds", "give the two ends of the interpolation as `seeds` (two integers) or `images` "
                               "(two images)", "missing_parameter")
    if seeds is not None and images is not None:
        raise invalid("images", "give the ends as `seeds` or as `images`, not both")
    class_id = parse_class(body)
    if seeds is not None:
        if not (isinstance(seeds, list) and len(seeds) == 2 and all(is_seed(s) for s in seeds)):
            raise invalid("seeds", f"seeds must be two integers in [0, {MAX_SEED_TEXT}], got {seeds!r}")
        job = InterpolationJob(class_id, frames, seeds=(seeds[0], seeds[1]))
    else:
        job = InterpolationJob(class_id, frames, images=check_images(images, count=(2, 2)))
    return OperationRequest(model, "interpolate", job)


def parse_reconstruction(body: Any, families: dict[str, str]) -> OperationRequest:
    """POST /v1/images/reconstructions."""
    body = check_body(body, {"model", "images", "prompt", "class_id"})
    model = resolve_model(body.get("model"), families, "reconstruct")
    job = ImagesJob(check_images(body.get("images")), parse_class(body))
    return OperationRequest(model, "reconstruct", job)


def parse_likelihood(body: Any, families: dict[str, str]) -> OperationRequest:
    """POST /v1/likelihood. `seed` picks the flow's dequantization noise (default 0: reproducible)."""
    body = check_body(body, {"model", "images", "prompt", "class_id", "seed"})
    model = resolve_model(body.get("model"), families, "likelihood")
    seed = check_seed(body.get("seed", 0))
    job = ImagesJob(check_images(body.get("images")), parse_class(body), seed)
    return OperationRequest(model, "log_likelihood", job)


# ---- the parts ---------------------------------------------------------------------------------------------

def resolve_model(model: Any, families: dict[str, str], operation: str) -> str:
    """The served model to run `operation` on: 404 for an unknown one, 400 for one whose family lacks it."""
    able = [name for name, family in families.items() if operation in FAMILY_OPERATIONS.get(family, ())]
    needs = " or ".join(f for f, ops in FAMILY_OPERATIONS.items() if operation in ops)
    if model is None or model == AUTO:
        if not able:
            raise model_not_found(f"no served model can {operation}: it needs a {needs} model")
        return able[0]
    check_model(model, families, auto=True)
    if model not in able:
        raise invalid("model", f"{model!r} is a {families[model]} model; {operation} needs a {needs} model "
                               f"(served: {', '.join(able) or 'none'})", "unsupported_operation")
    return model


def parse_class(body: dict[str, Any]) -> int:
    """The class from `prompt` and / or `class_id`, by the rule generations use; neither: NULL_CLASS."""
    return class_of(body.get("prompt"), body.get("class_id"))


# ---- responses -----------------------------------------------------------------------------------------------

def _served(req: OperationRequest, result: Any, latency_ms: float) -> dict[str, Any]:
    """What every operation's response says about who served it and how long it took."""
    return {"created": int(time.time()), "model": result.model, "version": result.version, "family": result.family,
            "class_id": req.job.class_id, "class_name": req.class_name,
            "latency_ms": round(latency_ms, 3), "replica_ms": round(result.replica_ms, 3)}


def _png(image: np.ndarray) -> str:
    return base64.b64encode(encode_png(image)).decode("ascii")


def interpolation_response(req: OperationRequest, result: GenerationResult, latency_ms: float) -> dict[str, Any]:
    return {**_served(req, result, latency_ms), "data": [{"b64_json": _png(im)} for im in result.images],
            "settings": {"endpoints": result.walk[0], "path": result.walk[1]}}


def reconstruction_response(req: OperationRequest, result: ReconstructionResult, latency_ms: float) -> dict[str, Any]:
    data = [{"b64_json": _png(im), "reconstruction_mse": round(float(e), 6)}
            for im, e in zip(result.images, result.mse)]
    return {**_served(req, result, latency_ms), "data": data}


def likelihood_response(req: OperationRequest, result: LikelihoodResult, latency_ms: float) -> dict[str, Any]:
    """bits/dim per image, the image's complexity (zlib bits per pixel) and their difference, the anomaly
    score (Serrà et al. 2020): higher is more unusual for the model."""
    complexity = complexity_bits_per_dim(req.job.images)
    data = [{"bits_per_dim": round(float(b), 5), "complexity_bits_per_dim": round(float(c), 5),
             "anomaly_score": round(float(b - c), 5)} for b, c in zip(result.bits_per_dim, complexity)]
    out = {**_served(req, result, latency_ms), "data": data}
    if result.family == "flow":
        out["seed"] = req.job.seed  # the dequantization noise: the flow's bits/dim is a one-sample estimate
    return out
