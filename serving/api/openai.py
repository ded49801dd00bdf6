"""The OpenAI Images API, translated to and from genserve's GenerationJob / GenerationResult. Pure: no Ray,
no runtime, so every message is tested without a server.

    POST /v1/images/generations   {model, prompt, n, size, response_format, + genserve extras}
    GET  /v1/models               OpenAI's list shape, with each model's family and version

Extras in the body (the openai client sends them with extra_body=...): class_id, seed, sampler, steps,
guidance_scale, latency_slo_ms, and the policy's hints goal, best_effort, max_fd, min_class_accuracy;
`quality` is the policy's tier (draft | standard | best; OpenAI's own low / medium / high / hd / auto
are read as draft / standard / best / best / none). The checks shared with the other APIs are in
validation.py; errors are serving.api.errors.APIError, answered in OpenAI's shape
{"error": {message, type, param, code}}.

Streaming, as OpenAI's image streaming: `stream: true` answers with server-sent events, `partial_images`
(0-3) `image_generation.partial_image` events per image (diffusion's current x̂₀, PixelCNN's pixels so
far; one-pass families have none) and then one `image_generation.completed` per image, each with genserve's
usual extras and `image_index` (which of the n images it is). An error after the stream began comes as an
`error` event with OpenAI's error body, which the openai client raises.
"""
from __future__ import annotations

import base64
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from core.contracts import NULL_CLASS
from serving.api.classes import CLASS_NAMES
from serving.api.errors import invalid
from serving.api.jobs import GenerationJob, GenerationPreview, GenerationResult, ModelInfo, PolicyHints
from serving.api.png import encode_png, upscale
from serving.api.validation import (MAX_UPSCALE, POLICY_HINTS, SAMPLING_EXTRAS, SIDE, check_body, check_n,
                                    check_seed, class_of, policy_hints, resolve_model, sampling_options)

# OpenAI fields accepted and ignored: they do not change a 28x28 grayscale sample
_IGNORED = {"user", "style", "background", "moderation"}
_KNOWN = {"model", "prompt", "n", "size", "response_format", "output_format", "class_id", "seed", "stream",
          "partial_images", *SAMPLING_EXTRAS, "latency_slo_ms", *POLICY_HINTS} | _IGNORED
MAX_PARTIAL_IMAGES = 3  # as OpenAI allows
# what OpenAI's stream events carry that a 28x28 grayscale sample has no say in
_EVENT_CONSTANTS = {"background": "opaque", "output_format": "png", "quality": "auto"}
_NO_USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0,
             "total_tokens": 0}


@dataclass(frozen=True)
class ImageRequest:
    """A validated POST /v1/images/generations."""

    model: str                  # a served model's name, or "auto"
    job: GenerationJob
    hints: PolicyHints
    upscale: int                # size = 28*upscale square
    class_name: str | None      # None: unconditional
    stream: bool = False        # server-sent events: partial images (job.previews of them), then the images


def parse_image_request(body: Any, families: dict[str, str]) -> ImageRequest:
    """Check a decoded JSON body against the served models (name -> family). Raises APIError: 404 for an
    unknown model, 400 for everything else wrong, each naming the offending field as `param`."""
    check_body(body, _KNOWN, shown=_KNOWN - _IGNORED)
    model = resolve_model(body.get("model"), families)
    family = families.get(model)  # None for auto

    n = body.get("n", 1)
    n = check_n(1 if n is None else n)

    factor = _parse_size(body.get("size"))
    response_format = body.get("response_format")
    response_format = "b64_json" if response_format is None else response_format
    if response_format == "url":
        raise invalid("response_format", "response_format 'url' is not supported: genserve returns images inline; "
                                         "use 'b64_json'", "unsupported_value")
    if response_format != "b64_json":
        raise invalid("response_format", f"response_format must be 'b64_json', got {response_format!r}")
    if body.get("output_format") not in (None, "png"):
        raise invalid("output_format", f"output_format must be 'png', got {body['output_format']!r}")

    class_id = class_of(body.get("prompt"), body.get("class_id"))

    seed = body.get("seed")
    # a drawn seed is reported in the response, so any image can be made again
    seed = secrets.randbits(32) if seed is None else check_seed(seed)
    stream, previews = _parse_stream(body.get("stream"), body.get("partial_images"))
    job = GenerationJob(class_id=class_id, n=n, seed=seed, previews=previews, **sampling_options(body, model, family))
    return ImageRequest(model, job, policy_hints(body), factor, None if class_id == NULL_CLASS else CLASS_NAMES[class_id],
                        stream)


def _parse_stream(stream: Any, partial_images: Any) -> tuple[bool, int]:
    """(stream, partial images): stream a bool (absent: false), partial_images an integer in [0, 3] that
    only a stream can carry (absent: 0)."""
    if stream not in (None, True, False):
        raise invalid("stream", f"stream must be true or false, got {stream!r}")
    if partial_images is None:
        return bool(stream), 0
    if not (isinstance(partial_images, int) and not isinstance(partial_images, bool)
            and 0 <= partial_images <= MAX_PARTIAL_IMAGES):
        raise invalid("partial_images", f"partial_images must be an integer in [0, {MAX_PARTIAL_IMAGES}], "
                                        f"got {partial_images!r}")
    if partial_images and not stream:
        raise invalid("partial_images", "partial_images needs stream: true (partial images are streamed)")
    return bool(stream), partial_images


def _b64_png(image) -> str:
    return base64.b64encode(encode_png(image)).decode("ascii")


def _parse_size(size: Any) -> int:
    """'28x28' -> 1, '56x56' -> 2, ...; absent -> 1."""
    if size is None:
        return 1
    if isinstance(size, str):
        w, sep, h = size.partition("x")
        # ASCII digits only: str.isdigit takes '²', which int() refuses
        if sep and w == h and len(w) <= 4 and w.isascii() and w.isdigit():
            if int(w) % SIDE == 0 and 1 <= int(w) // SIDE <= MAX_UPSCALE:
                return int(w) // SIDE
    raise invalid("size", f"size must be '{SIDE}x{SIDE}' or an integer multiple of it such as "
                          f"'{2 * SIDE}x{2 * SIDE}' (at most {MAX_UPSCALE * SIDE}x{MAX_UPSCALE * SIDE}), got {size!r}")


def images_response(req: ImageRequest, result: GenerationResult, latency_ms: float) -> dict[str, Any]:
    """OpenAI's ImagesResponse ({created, data: [{b64_json}]}) plus what served it and how long it took."""
    return {"created": int(time.time()), "data": [{"b64_json": _b64_png(img)} for img in upscale(result.images, req.upscale)],
            **_served_by(req, result, latency_ms)}


def _served_by(req: ImageRequest, result: GenerationResult, latency_ms: float) -> dict[str, Any]:
    """genserve's extras on a response: what served it, at which settings, how long it took, and why."""
    return {"model": result.model, "version": result.version, "family": result.family,
            "class_id": req.job.class_id, "class_name": req.class_name, "seed": req.job.seed,
            "settings": result.settings.to_dict(),
            "latency_ms": round(latency_ms, 3), "replica_ms": round(result.replica_ms, 3), "policy": result.policy}


def stream_events(req: ImageRequest, event: GenerationPreview | GenerationResult, latency_ms: float
                  ) -> list[dict[str, Any]]:
    """One engine event as OpenAI stream events, one per image: image_generation.partial_image for a preview,
    image_generation.completed (with what images_response adds) for the result."""
    common = {"created_at": int(time.time()), "size": f"{SIDE * req.upscale}x{SIDE * req.upscale}",
              **_EVENT_CONSTANTS}
    images = upscale(event.images, req.upscale)
    if isinstance(event, GenerationPreview):
        return [{"type": "image_generation.partial_image", "b64_json": _b64_png(img), **common,
                 "partial_image_index": event.index, "image_index": i, "step": event.step, "steps": event.steps,
                 "model": event.model, "latency_ms": round(latency_ms, 3)} for i, img in enumerate(images)]
    return [{"type": "image_generation.completed", "b64_json": _b64_png(img), **common, "usage": _NO_USAGE,
             "image_index": i, **_served_by(req, event, latency_ms)} for i, img in enumerate(images)]


def policy_headers(result: GenerationResult) -> dict[str, str]:
    """The policy's choice in HTTP headers too, for clients that do not read the body's extras."""
    p = result.policy or {}
    headers = {"X-Genserve-Model": result.model, "X-Genserve-Node": result.node}
    if "predicted_ms" in p:
        headers |= {"X-Genserve-Predicted-Ms": str(p["predicted_ms"]), "X-Genserve-Actual-Ms": str(p["actual_ms"])}
    if settings := result.settings.to_dict():
        headers["X-Genserve-Settings"] = ",".join(f"{k}={v}" for k, v in settings.items())
    return headers


def model_object(info: ModelInfo) -> dict[str, Any]:
    """One entry of GET /v1/models: OpenAI's Model ({id, object, created, owned_by}) plus genserve's fields."""
    created = int(datetime.fromisoformat(info.created_at).timestamp())
    return {"id": info.name, "object": "model", "created": created, "owned_by": "genserve",
            "family": info.family, "version": info.version, "path": info.path, "provider": info.provider,
            "threads": info.threads,
            "node_threads": info.node_threads, "settings": info.settings, "operations": list(info.operations),
            "metrics": info.metrics, "latency": info.latency}


def models_response(infos: list[ModelInfo]) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(i) for i in infos]}
