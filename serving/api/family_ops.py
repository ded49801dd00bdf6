"""The families' own operations over HTTP, translated to and from the internal jobs (serving.api.jobs).
Pure: no Ray, no runtime, so every message is tested without a server.

    POST /v1/images/interpolations   {model, seeds: [a, b] | images: [a, b], frames, prompt | class_id}   vae
    POST /v1/images/reconstructions  {model, images: [...], prompt | class_id}                            vae
    POST /v1/likelihood              {model, images: [...], prompt | class_id, seed}                      flow, pixelcnn

`model` absent or "auto" is the first served model (in the Serve config's order) that has the operation.
An image is a base64 PNG, 28x28 8-bit grayscale (a `data:image/png;base64,` URL too), or 28 rows of 28
integers 0..255. The class conditions the model; absent, the unconditional model (class id 10) is used,
which is what an anomaly detector wants. Errors are OpenAI's shape, as the rest of the HTTP API.
"""
from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.contracts import IMAGE_SHAPE, NULL_CLASS
from serving.api.classes import CLASS_NAMES, class_from_prompt, class_list
from serving.api.jobs import (GenerationResult, ImagesJob, InterpolationJob, LikelihoodResult,
                              ReconstructionResult)
from serving.api.openai import AUTO, MAX_SEED, APIError, invalid
from serving.api.png import decode_png, encode_png
from serving.operations import FAMILY_OPERATIONS, complexity_bits_per_dim

MAX_IMAGES = 64          # images per reconstruction / likelihood request: one forward at the profiled batch 64
MAX_FRAMES = 32          # frames per interpolation
DEFAULT_FRAMES = 8
SIDE = IMAGE_SHAPE[-1]
_DATA_URL = "data:image/png;base64,"


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
    body = _object(body, {"model", "seeds", "images", "frames", "prompt", "class_id"})
    model = resolve_model(body.get("model"), families, "interpolate")
    frames = body.get("frames", DEFAULT_FRAMES)
    if not _is_int(frames) or not 2 <= frames <= MAX_FRAMES:
        raise invalid("frames", f"frames must be an integer in [2, {MAX_FRAMES}] (both ends included), got {frames!r}")
    seeds, images = body.get("seeds"), body.get("images")
    if seeds is None and images is None:
        raise invalid("seeds", "give the two ends of the interpolation as `seeds` (two integers) or `images` "
                               "(two images)", "missing_parameter")
    if seeds is not None and images is not None:
        raise invalid("images", "give the ends as `seeds` or as `images`, not both")
    class_id = parse_class(body)
    if seeds is not None:
        if not (isinstance(seeds, list) and len(seeds) == 2 and all(_is_int(s) and 0 <= s <= MAX_SEED for s in seeds)):
            raise invalid("seeds", f"seeds must be two integers in [0, 2**64 - 1], got {seeds!r}")
        job = InterpolationJob(class_id, frames, seeds=(seeds[0], seeds[1]))
    else:
        job = InterpolationJob(class_id, frames, images=parse_images(images, count=(2, 2)))
    return OperationRequest(model, "interpolate", job)


def parse_reconstruction(body: Any, families: dict[str, str]) -> OperationRequest:
    """POST /v1/images/reconstructions."""
    body = _object(body, {"model", "images", "prompt", "class_id"})
    model = resolve_model(body.get("model"), families, "reconstruct")
    job = ImagesJob(parse_images(body.get("images")), parse_class(body))
    return OperationRequest(model, "reconstruct", job)


def parse_likelihood(body: Any, families: dict[str, str]) -> OperationRequest:
    """POST /v1/likelihood. `seed` picks the flow's dequantization noise (default 0: reproducible)."""
    body = _object(body, {"model", "images", "prompt", "class_id", "seed"})
    model = resolve_model(body.get("model"), families, "likelihood")
    seed = body.get("seed", 0)
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise invalid("seed", f"seed must be an integer in [0, 2**64 - 1], got {seed!r}")
    job = ImagesJob(parse_images(body.get("images")), parse_class(body), seed)
    return OperationRequest(model, "log_likelihood", job)


# ---- the parts ---------------------------------------------------------------------------------------------

def resolve_model(model: Any, families: dict[str, str], operation: str) -> str:
    """The served model to run `operation` on: 404 for an unknown one, 400 for one whose family lacks it."""
    able = [name for name, family in families.items() if operation in FAMILY_OPERATIONS.get(family, ())]
    needs = " or ".join(f for f, ops in FAMILY_OPERATIONS.items() if operation in ops)
    if model is None or model == AUTO:
        if not able:
            raise APIError(404, f"no served model can {operation}: it needs a {needs} model", param="model",
                           code="model_not_found")
        return able[0]
    if not isinstance(model, str):
        raise invalid("model", f"model must be a string, got {model!r}")
    if model not in families:
        raise APIError(404, f"the model {model!r} does not exist; served models: {', '.join(sorted(families))}",
                       param="model", code="model_not_found")
    if model not in able:
        raise invalid("model", f"{model!r} is a {families[model]} model; {operation} needs a {needs} model "
                               f"(served: {', '.join(able) or 'none'})", "unsupported_operation")
    return model


def parse_class(body: dict[str, Any]) -> int:
    """The class from `prompt` (a class name, as in generations) or `class_id`; neither: NULL_CLASS."""
    prompt, class_id = body.get("prompt"), body.get("class_id")
    if prompt is not None and class_id is not None:
        raise invalid("class_id", "give the class as `prompt` or `class_id`, not both")
    if class_id is not None:
        if not _is_int(class_id) or not 0 <= class_id <= NULL_CLASS:
            raise invalid("class_id", f"class_id must be an integer in [0, {NULL_CLASS}] ({NULL_CLASS} = no class), "
                                      f"got {class_id!r}; classes: {class_list()}")
        return class_id
    if prompt is not None and not isinstance(prompt, str):
        raise invalid("prompt", f"prompt must be a string, got {prompt!r}")
    try:
        return class_from_prompt(prompt or "")
    except ValueError as exc:
        raise invalid("prompt", str(exc)) from None


def parse_images(value: Any, count: tuple[int, int] = (1, MAX_IMAGES), param: str = "images") -> np.ndarray:
    """A JSON list of images -> uint8 [n, 28, 28], count[0] <= n <= count[1]."""
    lo, hi = count
    if not isinstance(value, list) or not lo <= len(value) <= hi:
        got = f"{len(value)} images" if isinstance(value, list) else repr(value)[:80]
        want = f"exactly {lo}" if lo == hi else f"{lo} to {hi}"
        raise invalid(param, f"{param} must be a list of {want} images, got {got}")
    return np.stack([parse_image(v, f"{param}[{i}]") for i, v in enumerate(value)])


def parse_image(value: Any, param: str) -> np.ndarray:
    """One image: a base64 PNG (8-bit grayscale) or 28 rows of 28 integers 0..255 -> uint8 [28, 28]."""
    if isinstance(value, str):
        text = value[len(_DATA_URL):] if value.startswith(_DATA_URL) else value
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise invalid(param, f"{param} is not valid base64 (a PNG as base64, or a {_DATA_URL} URL)") from None
        try:
            image = decode_png(data)
        except ValueError as exc:
            raise invalid(param, f"{param}: {exc}") from None
        if image.shape != (SIDE, SIDE):
            raise invalid(param, f"{param} is {image.shape[1]}x{image.shape[0]}; images must be {SIDE}x{SIDE}")
        return image
    if isinstance(value, list):
        if len(value) != SIDE or not all(isinstance(row, list) and len(row) == SIDE for row in value):
            raise invalid(param, f"{param} must be {SIDE} rows of {SIDE} integers 0..255")
        if not all(_is_int(v) and 0 <= v <= 255 for row in value for v in row):
            raise invalid(param, f"{param}: every pixel must be an integer in [0, 255]")
        return np.array(value, dtype=np.uint8)
    raise invalid(param, f"{param} must be a base64 PNG string or {SIDE} rows of {SIDE} integers, "
                         f"got {type(value).__name__}")


def _object(body: Any, known: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    if unknown := sorted(set(body) - known):
        raise invalid(unknown[0], f"unrecognized request argument: {unknown[0]!r}; this operation takes "
                                  f"{', '.join(sorted(known))}", "unknown_parameter")
    return body


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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
            "settings": result.settings}


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
