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
from serving.api.jobs import GenerationJob, GenerationResult, ModelInfo, PolicyHints
from serving.api.png import encode_png, upscale
from serving.api.validation import (MAX_UPSCALE, POLICY_HINTS, SAMPLING_EXTRAS, SIDE, check_body, check_n,
                                    check_seed, class_of, policy_hints, resolve_model, sampling_options)

# OpenAI fields accepted and ignored: they do not change a 28x28 grayscale sample
_IGNORED = {"user", "style", "background", "moderation"}
_KNOWN = {"model", "prompt", "n", "size", "response_format", "output_format", "class_id", "seed",
          *SAMPLING_EXTRAS, "latency_slo_ms", *POLICY_HINTS} | _IGNORED


@dataclass(frozen=True)
class ImageRequest:
    """A validated POST /v1/images/generations."""

    model: str                  # a served model's name, or "auto"
    job: GenerationJob
    hints: PolicyHints
    upscale: int                # size = 28*upscale square
    class_name: str | None      # None: unconditional


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
    job = GenerationJob(class_id=class_id, n=n, seed=seed, **sampling_options(body, model, family))
    return ImageRequest(model, job, policy_hints(body), factor, None if class_id == NULL_CLASS else CLASS_NAMES[class_id])


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
    data = [{"b64_json": base64.b64encode(encode_png(img)).decode("ascii")} for img in upscale(result.images, req.upscale)]
    return {"created": int(time.time()), "data": data,
            "model": result.model, "version": result.version, "family": result.family,
            "class_id": req.job.class_id, "class_name": req.class_name, "seed": req.job.seed,
            "settings": result.settings.to_dict(),
            "latency_ms": round(latency_ms, 3), "replica_ms": round(result.replica_ms, 3), "policy": result.policy}


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
