"""The request checks every public API shares — the OpenAI Images API (openai.py), KServe v2 (kserve.py)
and the families' own operations (family_ops.py) — and the limits they check against, which the OpenAPI
document (openapi.py) reads for its schemas' bounds, so the two cannot drift apart.

Each check returns what it accepts or raises a 400 APIError (serving.api.errors) whose `param` and
message name the field and the value; an unknown model is a 404. No Ray, no runtime, no torch.

The limits below are the whole list a client meets at the edge (the README's "Limits at the edge" table lists
them, and a test checks the table against these constants); the HTTP request's own limits are enforced by
serving/api/http.py."""
from __future__ import annotations

import base64
import binascii
import math
import os
import re
from collections.abc import Collection, Iterable
from typing import Any

import numpy as np

from core.checks import is_int
from core.contracts import IMAGE_SHAPE, NULL_CLASS, NUM_TRAIN_TIMESTEPS
from core.settings import SAMPLER_NAMES, SamplingSetting
from serving.api.classes import CLASS_NAMES, class_from_prompt, class_list
from serving.api.errors import APIError, invalid, model_not_found
from serving.api.jobs import PolicyHints
from serving.api.png import decode_png
from serving.policy.candidates import GOAL_FAMILIES, TIERS

# ---- limits ------------------------------------------------------------------------------------------------
AUTO = "auto"                     # `model`: the latency/quality policy picks the model and its settings
MAX_N = 16                        # images per generation request, as the API has promised from the start
MAX_SEED = 2**64 - 1              # the engine's range (torch.Generator.manual_seed); numpy takes it too
MAX_SEED_TEXT = "2**64 - 1"       # MAX_SEED as messages write it
MAX_STEPS = NUM_TRAIN_TIMESTEPS   # a sampler cannot take more steps than the model has timesteps
MAX_CLASS_ID = NULL_CLASS         # class ids 0..9, and 10 = no class (the unconditional model)
MAX_PROMPT_CHARS = 1000           # OpenAI's own limit for dall-e-2; a class name takes a few words
MAX_GUIDANCE_SCALE = 20.0         # classifier-free guidance: the manifests' settings use 2; past ~10 it only saturates
MAX_LATENCY_SLO_MS = 600_000      # 10 minutes: far beyond any generation here (the ingress gives up after 120 s)
MAX_TIMEOUT_US = MAX_LATENCY_SLO_MS * 1000   # KServe v2's `timeout` parameter (Triton's, in microseconds)
SIDE = IMAGE_SHAPE[-1]            # every image is SIDE x SIDE, 8-bit grayscale
MAX_PIXEL = 255
MAX_UPSCALE = 16                  # generated sizes up to 448x448
MAX_IMAGES = 64                   # images per reconstruction / likelihood request: one forward at batch 64
MAX_PNG_BYTES = 64 * 1024         # one uploaded PNG; a 28x28 8-bit one is under 1 KB even stored uncompressed
MIN_FRAMES, MAX_FRAMES, DEFAULT_FRAMES = 2, 32, 8   # interpolation frames, both ends included
# The HTTP body (every route; GENSERVE_MAX_BODY_BYTES overrides it): the largest valid request, 64 images as
# JSON rows of pixels, takes ~250 KB
MAX_BODY_BYTES = 1 << 20
MAX_BODY_BYTES_ENV = "GENSERVE_MAX_BODY_BYTES"
MAX_JSON_DEPTH = 32               # nesting of a JSON body; the deepest valid request (images as rows) goes 5 deep
# What Serve's HTTP proxy lets through unbounded (uvicorn with httptools): the request's headers, all together
# (nginx's default buffers hold 32 KB), and its path and query
MAX_HEADER_BYTES = 32 * 1024
MAX_URL_BYTES = 8 * 1024

# ---- vocabularies --------------------------------------------------------------------------------------------
SAMPLERS = SAMPLER_NAMES          # the engine re-checks against core.samplers' registry
SAMPLING_EXTRAS = ("sampler", "steps", "guidance_scale")
ITERATIVE_EXTRAS = {"diffusion": SAMPLING_EXTRAS}   # family -> the sampling extras it takes
GOALS = tuple(GOAL_FAMILIES)      # sample | likelihood | latent
# OpenAI's own quality values (dall-e-3, gpt-image-1) as the policy's tiers; auto: no tier
OPENAI_QUALITY = {"low": "draft", "medium": "standard", "standard": "standard", "high": "best", "hd": "best",
                  "auto": None}
QUALITY_VALUES = tuple(dict.fromkeys((*TIERS, *OPENAI_QUALITY)))   # what `quality` may be
POLICY_HINTS = ("quality", "goal", "best_effort", "max_fd", "min_class_accuracy", "cascade", "cascade_threshold")
_DATA_URL = "data:image/png;base64,"
CONTROL_CHARS = r"\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f"   # a prompt's refused: C0 and C1 controls but tab, LF, CR
_CONTROL = re.compile(f"[{CONTROL_CHARS}]")


def max_body_bytes() -> int:
    """The body limit: GENSERVE_MAX_BODY_BYTES (a positive integer) if set, else MAX_BODY_BYTES. Raises
    ValueError for a bad setting, so that a replica fails to start rather than run unguarded."""
    value = os.environ.get(MAX_BODY_BYTES_ENV)
    if value is None:
        return MAX_BODY_BYTES
    if not (value.isascii() and value.isdigit() and int(value) > 0):
        raise ValueError(f"{MAX_BODY_BYTES_ENV} must be a positive integer (bytes), got {value!r}")
    return int(value)


def is_real(value: Any) -> bool:
    """A finite number, not a bool. An int of any size counts (JSON's are unbounded): core.checks.is_number
    converts ints to float, which overflows past 1e308."""
    return is_int(value) or (isinstance(value, float) and math.isfinite(value))


def check_body(body: Any, known: Iterable[str], shown: Iterable[str] | None = None) -> dict[str, Any]:
    """A JSON object with no field outside `known`; the message for an unknown one lists `shown` (default:
    known)."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    if unknown := sorted(set(body) - set(known)):
        raise invalid(unknown[0], f"unrecognized request argument: {unknown[0]!r}; it takes "
                                  f"{', '.join(sorted(shown if shown is not None else known))}", "unknown_parameter")
    return body


# ---- models --------------------------------------------------------------------------------------------------

def resolve_model(model: Any, families: dict[str, str]) -> str:
    """The served model a generation names (families: name -> family), or AUTO (absent or "auto": the
    policy chooses). 404 for an unknown one."""
    if model is None or model == AUTO:
        return AUTO
    return check_model(model, families, auto=True)


def check_model(model: Any, served: Collection[str], *, auto: bool = False) -> str:
    """A served model's name: 400 if not a string, 404 if not served (the message lists the served ones,
    and AUTO where the route takes it)."""
    if not isinstance(model, str):
        raise invalid("model", f"model must be a string, got {model!r}")
    if model not in served:
        raise model_not_found(f"the model {model!r} does not exist; served models: {', '.join(sorted(served))}"
                              + (f" (or {AUTO!r})" if auto else ""))
    return model


# ---- numbers -------------------------------------------------------------------------------------------------

def check_n(n: Any) -> int:
    if not is_int(n) or not 1 <= n <= MAX_N:
        raise invalid("n", f"n must be an integer in [1, {MAX_N}], got {n!r}")
    return n


def is_seed(seed: Any) -> bool:
    return is_int(seed) and 0 <= seed <= MAX_SEED


def check_seed(seed: Any, param: str = "seed") -> int:
    if not is_seed(seed):
        raise invalid(param, f"{param} must be an integer in [0, {MAX_SEED_TEXT}], got {seed!r}")
    return seed


def check_frames(frames: Any) -> int:
    if not is_int(frames) or not MIN_FRAMES <= frames <= MAX_FRAMES:
        raise invalid("frames", f"frames must be an integer in [{MIN_FRAMES}, {MAX_FRAMES}] (both ends included), "
                                f"got {frames!r}")
    return frames


def sampling_options(values: dict[str, Any], model: str, family: str | None) -> dict[str, Any]:
    """GenerationJob's setting (sampler, steps, guidance_scale) and timeout_s from a request's sampler, steps,
    guidance_scale (diffusion only; with auto (family None) they restrict the policy's choice to diffusion
    settings that match) and latency_slo_ms, each checked; absent ones are None."""
    allowed = SAMPLING_EXTRAS if family is None else ITERATIVE_EXTRAS.get(family, ())
    for name in SAMPLING_EXTRAS:
        if values.get(name) is not None and name not in allowed:
            takes = [f for f, extras in ITERATIVE_EXTRAS.items() if name in extras]
            raise invalid(name, f"{name} applies only to {' and '.join(takes)} models; {model!r} is a {family} "
                                "model", "unsupported_parameter")
    sampler, steps, guidance = values.get("sampler"), values.get("steps"), values.get("guidance_scale")
    if sampler is not None and sampler not in SAMPLERS:
        raise invalid("sampler", f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if steps is not None and (not is_int(steps) or not 1 <= steps <= MAX_STEPS):
        raise invalid("steps", f"steps must be an integer in [1, {MAX_STEPS}], got {steps!r}")
    if guidance is not None and (not is_real(guidance) or guidance < 0):
        raise invalid("guidance_scale", f"guidance_scale must be a finite number >= 0, got {guidance!r}")
    if guidance is not None and guidance > MAX_GUIDANCE_SCALE:
        raise invalid("guidance_scale", f"guidance_scale must be at most {MAX_GUIDANCE_SCALE:g}, got {guidance!r}")
    slo = values.get("latency_slo_ms")
    if slo is not None and (not is_real(slo) or slo <= 0):
        raise invalid("latency_slo_ms", f"latency_slo_ms must be a number > 0, got {slo!r}")
    if slo is not None and slo > MAX_LATENCY_SLO_MS:
        raise invalid("latency_slo_ms", f"latency_slo_ms must be at most {MAX_LATENCY_SLO_MS} (10 minutes), "
                                        f"got {slo!r}")
    return {"setting": SamplingSetting(sampler, steps, None if guidance is None else float(guidance)),
            "timeout_s": None if slo is None else slo / 1000}


def policy_hints(values: dict[str, Any]) -> PolicyHints:
    """The policy's hints from a request's quality (tier), goal, best_effort, max_fd, min_class_accuracy,
    cascade and cascade_threshold (the judge's confidence an image needs to skip diffusion, in [0, 1])."""
    quality = values.get("quality")
    tier = OPENAI_QUALITY.get(quality, quality) if isinstance(quality, str) else quality
    if tier is not None and tier not in TIERS:
        raise invalid("quality", f"quality must be one of {', '.join(TIERS)} (or OpenAI's "
                                 f"{', '.join(OPENAI_QUALITY)}), got {quality!r}")
    goal = values.get("goal")
    goal = "sample" if goal is None else goal
    if goal not in GOALS:
        raise invalid("goal", f"goal must be one of {', '.join(GOALS)}, got {goal!r}")
    best_effort = values.get("best_effort", False)
    if not isinstance(best_effort, bool):
        raise invalid("best_effort", f"best_effort must be true or false, got {best_effort!r}")
    max_fd, min_acc = values.get("max_fd"), values.get("min_class_accuracy")
    if max_fd is not None and (not is_real(max_fd) or max_fd <= 0):
        raise invalid("max_fd", f"max_fd must be a number > 0, got {max_fd!r}")
    if min_acc is not None and (not is_real(min_acc) or not 0 <= min_acc <= 1):
        raise invalid("min_class_accuracy", f"min_class_accuracy must be a number in [0, 1], got {min_acc!r}")
    cascade, threshold = values.get("cascade", False), values.get("cascade_threshold")
    if not isinstance(cascade, bool):
        raise invalid("cascade", f"cascade must be true or false, got {cascade!r}")
    if threshold is not None and (not is_real(threshold) or not 0 <= threshold <= 1):
        raise invalid("cascade_threshold", f"cascade_threshold must be a number in [0, 1], got {threshold!r}")
    if threshold is not None and not cascade:
        raise invalid("cascade_threshold", "cascade_threshold applies only with cascade: true")
    return PolicyHints(tier, max_fd, min_acc, goal, best_effort, cascade,
                       None if threshold is None else float(threshold))


# ---- the class -----------------------------------------------------------------------------------------------

def check_class_id(class_id: Any) -> int:
    if not is_int(class_id) or not 0 <= class_id <= MAX_CLASS_ID:
        raise invalid("class_id", f"class_id must be an integer in [0, {MAX_CLASS_ID}] ({NULL_CLASS} = no class), "
                                  f"got {class_id!r}; classes: {class_list()}")
    return class_id


def class_of(prompt: Any, class_id: Any) -> int:
    """The class a request asks for, from `prompt` (a class name; plurals and synonyms fine) and `class_id`:

    - neither, or an empty prompt: NULL_CLASS, the unconditional model;
    - a prompt that names a class: that class; with a class_id too, the two must agree;
    - a class_id with a prompt that names no class (free text: OpenAI's client always sends a prompt): the
      class_id decides.
    A prompt alone that names no class, or more than one, is a 400 listing the classes."""
    if prompt is not None and not isinstance(prompt, str):
        raise invalid("prompt", f"prompt must be a string, got {prompt!r}")
    if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
        raise invalid("prompt", f"prompt must be at most {MAX_PROMPT_CHARS} characters, got {len(prompt)}")
    if prompt is not None and (found := _CONTROL.search(prompt)):
        raise invalid("prompt", f"prompt must not contain control characters, got {found.group()!r} at "
                                f"{found.start()}")
    if class_id is not None:
        check_class_id(class_id)
    try:
        from_prompt = class_from_prompt(prompt or "")
    except ValueError as exc:
        if class_id is None:
            raise invalid("prompt", str(exc)) from None
        from_prompt = NULL_CLASS
    if class_id is None:
        return from_prompt
    if from_prompt not in (NULL_CLASS, class_id):
        named = CLASS_NAMES[class_id] if class_id < NULL_CLASS else "no class"
        raise invalid("class_id", f"class_id {class_id} ({named}) contradicts the prompt, which names "
                                  f"{CLASS_NAMES[from_prompt]}")
    return class_id


# ---- images --------------------------------------------------------------------------------------------------

def check_images(value: Any, count: tuple[int, int] = (1, MAX_IMAGES), param: str = "images") -> np.ndarray:
    """A JSON list of images -> uint8 [n, SIDE, SIDE], count[0] <= n <= count[1]."""
    lo, hi = count
    if not isinstance(value, list) or not lo <= len(value) <= hi:
        got = f"{len(value)} images" if isinstance(value, list) else repr(value)[:80]
        want = f"exactly {lo}" if lo == hi else f"{lo} to {hi}"
        raise invalid(param, f"{param} must be a list of {want} images, got {got}")
    return np.stack([check_image(v, f"{param}[{i}]") for i, v in enumerate(value)])


def check_image(value: Any, param: str) -> np.ndarray:
    """One image: a base64 PNG, 8-bit grayscale SIDE x SIDE (a data URL too), or SIDE rows of SIDE integers
    0..255 -> uint8 [SIDE, SIDE]."""
    if isinstance(value, str):
        text = value[len(_DATA_URL):] if value.startswith(_DATA_URL) else value
        if len(text) > 4 * math.ceil(MAX_PNG_BYTES / 3):  # base64's size, checked before decoding
            raise invalid(param, f"{param}: the PNG must be at most {MAX_PNG_BYTES} bytes, got about "
                                 f"{len(text) * 3 // 4}")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise invalid(param, f"{param} is not valid base64 (a PNG as base64, or a {_DATA_URL} URL)") from None
        try:
            return decode_png(data, shape=(SIDE, SIDE))
        except ValueError as exc:
            raise invalid(param, f"{param}: {exc}") from None
    if isinstance(value, list):
        if len(value) != SIDE or not all(isinstance(row, list) and len(row) == SIDE for row in value):
            raise invalid(param, f"{param} must be {SIDE} rows of {SIDE} integers 0..{MAX_PIXEL}")
        if not all(is_int(v) and 0 <= v <= MAX_PIXEL for row in value for v in row):
            raise invalid(param, f"{param}: every pixel must be an integer in [0, {MAX_PIXEL}]")
        return np.array(value, dtype=np.uint8)
    raise invalid(param, f"{param} must be a base64 PNG string or {SIDE} rows of {SIDE} integers, "
                         f"got {type(value).__name__}")
