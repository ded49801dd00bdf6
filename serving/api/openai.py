"""The OpenAI Images API, translated to and from genserve's GenerationJob / GenerationResult. Pure: no Ray,
no runtime, so every message is tested without a server.

    POST /v1/images/generations   {model, prompt, n, size, response_format, + genserve extras}
    GET  /v1/models               OpenAI's list shape, with each model's family and version

Extras in the body (the openai client sends them with extra_body=...): class_id, seed, sampler, steps,
guidance_scale, latency_slo_ms, and the policy's hints goal, best_effort, max_fd, min_class_accuracy;
`quality` is the policy's tier (draft | standard | best; OpenAI's own low / medium / high / hd / auto
are read as draft / standard / best / best / none). Errors are OpenAI's shape
{"error": {message, type, param, code}}.
"""
from __future__ import annotations

import base64
import math
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from core.contracts import IMAGE_SHAPE, NULL_CLASS, NUM_TRAIN_TIMESTEPS
from serving.api.classes import CLASS_NAMES, class_from_prompt, class_list
from serving.api.jobs import GenerationJob, GenerationResult, ModelInfo, PolicyHints
from serving.api.png import encode_png, upscale

MAX_N = 16                      # images per request, as the API promises
MAX_UPSCALE = 16                # sizes up to 448x448
MAX_SEED = 2**64 - 1            # the engine's range (torch.Generator.manual_seed); numpy takes it too
SAMPLERS = ("ddim", "dpmpp_2m")  # mirrors core.samplers.loop.SAMPLERS, which the engine re-checks
AUTO = "auto"                   # `model`: the latency/quality policy picks the model and its settings
ITERATIVE_EXTRAS = {"diffusion": ("sampler", "steps", "guidance_scale")}  # family -> extras it takes
TIERS = ("draft", "standard", "best")  # mirrors serving.policy.TIERS (the policy stays out of the API layer)
GOALS = ("sample", "likelihood", "latent")
# OpenAI's own quality values (dall-e-3, gpt-image-1) as tiers
_OPENAI_QUALITY = {"low": "draft", "medium": "standard", "standard": "standard", "high": "best", "hd": "best",
                   "auto": None}
POLICY_HINTS = ("quality", "goal", "best_effort", "max_fd", "min_class_accuracy")
# OpenAI fields accepted and ignored: they do not change a 28x28 grayscale sample
_IGNORED = {"user", "style", "background", "moderation"}
_KNOWN = {"model", "prompt", "n", "size", "response_format", "output_format", "class_id", "seed", "sampler",
          "steps", "guidance_scale", "latency_slo_ms", *POLICY_HINTS} | _IGNORED


class APIError(Exception):
    """An error answered in OpenAI's shape; 4xx is the client's, 5xx ours."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after_s = retry_after_s  # a 429 / 503's Retry-After; None: retrying later will not help

    def headers(self) -> dict[str, str] | None:
        """Retry-After (whole seconds, rounded up) on a 429 that waiting helps, and on every 503."""
        if self.retry_after_s is not None:
            return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}
        return {"Retry-After": "1"} if self.status == 503 else None

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    if unknown := sorted(set(body) - _KNOWN):
        raise invalid(unknown[0], f"unrecognized request argument: {unknown[0]!r}; genserve takes "
                                  f"{', '.join(sorted(_KNOWN - _IGNORED))}", "unknown_parameter")

    model = resolve_model(body.get("model"), families)
    family = families.get(model)  # None for auto

    n = body.get("n", 1)
    n = 1 if n is None else n
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise invalid("n", f"n must be an integer in [1, {MAX_N}], got {n!r}")

    factor = _parse_size(body.get("size"))
    response_format = body.get("response_format") or "b64_json"
    if response_format == "url":
        raise invalid("response_format", "response_format 'url' is not supported: genserve returns images inline; "
                                         "use 'b64_json'", "unsupported_value")
    if response_format != "b64_json":
        raise invalid("response_format", f"response_format must be 'b64_json', got {response_format!r}")
    if body.get("output_format") not in (None, "png"):
        raise invalid("output_format", f"output_format must be 'png', got {body['output_format']!r}")

    class_id = _parse_class(body.get("prompt"), body.get("class_id"))

    seed = body.get("seed")
    # a drawn seed is reported in the response, so any image can be made again
    seed = secrets.randbits(32) if seed is None else check_seed(seed)
    job = GenerationJob(class_id=class_id, n=n, seed=seed, **sampling_options(body, model, family))
    return ImageRequest(model, job, policy_hints(body), factor, None if class_id == NULL_CLASS else CLASS_NAMES[class_id])


# ---- checks every API shares (OpenAI here, KServe v2 in kserve.py) ---------------------------------------

def resolve_model(model: Any, families: dict[str, str]) -> str:
    """The served model a request names, or AUTO (absent or "auto": the policy chooses). 404 if none."""
    if model is None or model == AUTO:
        return AUTO
    if not isinstance(model, str):
        raise invalid("model", f"model must be a string, got {model!r}")
    if model not in families:
        raise APIError(404, f"the model {model!r} does not exist; served models: {', '.join(sorted(families))} "
                            f"(or {AUTO!r})", param="model", code="model_not_found")
    return model


def check_class_id(class_id: Any) -> int:
    if not _is_int(class_id) or not 0 <= class_id <= NULL_CLASS:
        raise invalid("class_id", f"class_id must be an integer in [0, {NULL_CLASS}] ({NULL_CLASS} = no class), "
                                  f"got {class_id!r}; classes: {class_list()}")
    return class_id


def check_seed(seed: Any) -> int:
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise invalid("seed", f"seed must be an integer in [0, 2**64 - 1], got {seed!r}")
    return seed


def sampling_options(values: dict[str, Any], model: str, family: str | None) -> dict[str, Any]:
    """GenerationJob's sampler, steps, guidance_scale and timeout_s from a request's sampler, steps,
    guidance_scale (diffusion only; with auto (family None) they restrict the policy's choice to diffusion
    settings that match) and latency_slo_ms, each checked; absent ones are None."""
    allowed = ("sampler", "steps", "guidance_scale") if family is None else ITERATIVE_EXTRAS.get(family, ())
    for name in ("sampler", "steps", "guidance_scale"):
        if values.get(name) is not None and name not in allowed:
            takes = [f for f, extras in ITERATIVE_EXTRAS.items() if name in extras]
            raise invalid(name, f"{name} applies only to {' and '.join(takes)} models; {model!r} is a {family} "
                                "model", "unsupported_parameter")
    sampler, steps, guidance = values.get("sampler"), values.get("steps"), values.get("guidance_scale")
    if sampler is not None and sampler not in SAMPLERS:
        raise invalid("sampler", f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if steps is not None and (not _is_int(steps) or not 1 <= steps <= NUM_TRAIN_TIMESTEPS):
        raise invalid("steps", f"steps must be an integer in [1, {NUM_TRAIN_TIMESTEPS}], got {steps!r}")
    if guidance is not None and (not _is_number(guidance) or guidance < 0):
        raise invalid("guidance_scale", f"guidance_scale must be a finite number >= 0, got {guidance!r}")
    slo = values.get("latency_slo_ms")
    if slo is not None and (not _is_number(slo) or slo <= 0):
        raise invalid("latency_slo_ms", f"latency_slo_ms must be a number > 0, got {slo!r}")
    return {"sampler": sampler, "steps": steps, "guidance_scale": None if guidance is None else float(guidance),
            "timeout_s": None if slo is None else slo / 1000}


def policy_hints(values: dict[str, Any]) -> PolicyHints:
    """The policy's hints from a request's quality (tier), goal, best_effort, max_fd, min_class_accuracy."""
    quality = values.get("quality")
    tier = _OPENAI_QUALITY.get(quality, quality) if isinstance(quality, str) else quality
    if tier is not None and tier not in TIERS:
        raise invalid("quality", f"quality must be one of {', '.join(TIERS)} (or OpenAI's low, medium, high, hd, "
                                 f"auto), got {quality!r}")
    goal = values.get("goal") or "sample"
    if goal not in GOALS:
        raise invalid("goal", f"goal must be one of {', '.join(GOALS)}, got {goal!r}")
    best_effort = values.get("best_effort", False)
    if not isinstance(best_effort, bool):
        raise invalid("best_effort", f"best_effort must be true or false, got {best_effort!r}")
    max_fd, min_acc = values.get("max_fd"), values.get("min_class_accuracy")
    if max_fd is not None and (not _is_number(max_fd) or max_fd <= 0):
        raise invalid("max_fd", f"max_fd must be a number > 0, got {max_fd!r}")
    if min_acc is not None and (not _is_number(min_acc) or not 0 <= min_acc <= 1):
        raise invalid("min_class_accuracy", f"min_class_accuracy must be a number in [0, 1], got {min_acc!r}")
    return PolicyHints(tier, max_fd, min_acc, goal, best_effort)


def _parse_size(size: Any) -> int:
    """'28x28' -> 1, '56x56' -> 2, ...; absent -> 1."""
    side = IMAGE_SHAPE[-1]
    if size is None:
        return 1
    if isinstance(size, str):
        w, sep, h = size.partition("x")
        if sep and w.isdigit() and w == h and int(w) % side == 0 and 1 <= int(w) // side <= MAX_UPSCALE:
            return int(w) // side
    raise invalid("size", f"size must be '{side}x{side}' or an integer multiple of it such as "
                          f"'{2 * side}x{2 * side}' (at most {MAX_UPSCALE * side}x{MAX_UPSCALE * side}), got {size!r}")


def _parse_class(prompt: Any, class_id: Any) -> int:
    if prompt is not None and not isinstance(prompt, str):
        raise invalid("prompt", f"prompt must be a string, got {prompt!r}")
    if class_id is not None:
        check_class_id(class_id)
    try:
        from_prompt = class_from_prompt(prompt or "")
    except ValueError as exc:
        if class_id is None:
            raise invalid("prompt", str(exc)) from None
        from_prompt = NULL_CLASS  # a free-text prompt next to an explicit class_id: the class_id decides
    if class_id is None:
        return from_prompt
    if from_prompt not in (NULL_CLASS, class_id):
        raise invalid("class_id", f"class_id {class_id} ({CLASS_NAMES[class_id] if class_id < NULL_CLASS else 'no class'})"
                                  f" contradicts the prompt, which names {CLASS_NAMES[from_prompt]}")
    return class_id


def images_response(req: ImageRequest, result: GenerationResult, latency_ms: float) -> dict[str, Any]:
    """OpenAI's ImagesResponse ({created, data: [{b64_json}]}) plus what served it and how long it took."""
    data = [{"b64_json": base64.b64encode(encode_png(img)).decode("ascii")} for img in upscale(result.images, req.upscale)]
    return {"created": int(time.time()), "data": data,
            "model": result.model, "version": result.version, "family": result.family,
            "class_id": req.job.class_id, "class_name": req.class_name, "seed": req.job.seed,
            "settings": result.settings,
            "latency_ms": round(latency_ms, 3), "replica_ms": round(result.replica_ms, 3), "policy": result.policy}


def policy_headers(result: GenerationResult) -> dict[str, str]:
    """The policy's choice in HTTP headers too, for clients that do not read the body's extras."""
    p = result.policy or {}
    headers = {"X-Genserve-Model": result.model}
    if "predicted_ms" in p:
        headers |= {"X-Genserve-Predicted-Ms": str(p["predicted_ms"]), "X-Genserve-Actual-Ms": str(p["actual_ms"])}
    if result.settings:
        headers["X-Genserve-Settings"] = ",".join(f"{k}={v}" for k, v in result.settings.items())
    return headers


def model_object(info: ModelInfo) -> dict[str, Any]:
    """One entry of GET /v1/models: OpenAI's Model ({id, object, created, owned_by}) plus genserve's fields."""
    created = int(datetime.fromisoformat(info.created_at).timestamp())
    return {"id": info.name, "object": "model", "created": created, "owned_by": "genserve",
            "family": info.family, "version": info.version, "path": info.path, "provider": info.provider,
            "threads": info.threads, "settings": info.settings, "operations": list(info.operations),
            "metrics": info.metrics, "latency": info.latency}


def models_response(infos: list[ModelInfo]) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(i) for i in infos]}
