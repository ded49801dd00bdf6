"""The OpenAPI document the ingress serves at /openapi.json.

The JSON routes read their raw bodies, so that each API answers malformed input in its own error shape
(FastAPI's body validation would answer first, in its own). Their bodies are described here instead, as
pydantic models used only for the schema: `describe(Request, Response)` gives a route decorator the
request body (a reference into components.schemas, which `openapi_document` fills) and the responses.
Their bounds and vocabularies are serving.api.validation's, the parsers' own, so the two cannot drift.
Each request model carries an example; tests/test_family_ops.py sends every example to the live server
and checks the answer against the response schema, and that the document and the routes agree;
tests/test_fuzz.py runs schemathesis against the document (no 5xx, every answer as documented).

KServe v2's routes are documented here too, by route (V2_ROUTES), with their own error shape
{"error": message}; what every route may answer besides (413 for a body, 401 with an API key configured)
is added to each operation by `openapi_document`."""
from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from serving.api import auth, kserve
from serving.api.png import encode_png
from serving.api.validation import (CONTROL_CHARS, DEFAULT_FRAMES, GOALS, MAX_CLASS_ID, MAX_FRAMES,
                                    MAX_GUIDANCE_SCALE, MAX_IMAGES, MAX_LATENCY_SLO_MS, MAX_N, MAX_PIXEL,
                                    MAX_PROMPT_CHARS, MAX_SEED, MAX_STEPS, MAX_TIMEOUT_US, MAX_UPSCALE, MIN_FRAMES,
                                    QUALITY_VALUES, SAMPLERS, SIDE)

DESCRIPTION = ("Generative image models trained on Fashion-MNIST (GAN, VAE, flow, PixelCNN, diffusion): the OpenAI "
               "Images API, KServe v2 under /v2, the families' own operations (latent interpolation, "
               "reconstruction, exact likelihood) and a playground page at /.")
_REQUEST_MODELS: list[type[BaseModel]] = []   # filled by describe(), rendered into components.schemas


class Strict(BaseModel):
    """A request body: unknown fields are a 400 (unknown_parameter)."""

    model_config = ConfigDict(extra="forbid")


# ---- shared pieces ---------------------------------------------------------------------------------------

class ErrorBody(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error (4xx) | rate_limit_error (429) | timeout_error (504) | "
                                  "server_error (other 5xx)")
    param: str | None = Field(description="the request field at fault, where there is one")
    code: str | None = Field(description="e.g. model_not_found, invalid_value, unknown_parameter, invalid_json, "
                                         "body_too_large, invalid_api_key, deadline_exceeded")


class ErrorResponse(BaseModel):
    """Every error outside /v2, with its HTTP status (KServe v2 routes answer {"error": message})."""

    error: ErrorBody


Pixel = Annotated[int, Field(ge=0, le=MAX_PIXEL)]
Row = Annotated[list[Pixel], Field(min_length=SIDE, max_length=SIDE)]
Image = Annotated[str | Annotated[list[Row], Field(min_length=SIDE, max_length=SIDE)], Field(
    description=f"a {SIDE}x{SIDE} 8-bit grayscale PNG as base64 (or a data:image/png;base64, URL), or {SIDE} rows "
                f"of {SIDE} integers 0..{MAX_PIXEL}")]
ModelName = Annotated[str, Field(description="a served model, or 'auto' / absent: the first served model "
                                             "that has the operation")]
PROMPT_PATTERN = f"^[^{CONTROL_CHARS}]*$"   # no control characters but tab, LF, CR
Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS, pattern=PROMPT_PATTERN, description=(
    "a Fashion-MNIST class name (synonyms and plurals fine): the condition. With class_id, it must name the same "
    "class or none; neither: the unconditional model"))]
ClassId = Annotated[int, Field(ge=0, le=MAX_CLASS_ID, description=f"0..{MAX_CLASS_ID - 1}, or {MAX_CLASS_ID} = no "
                                                                 "class (the unconditional model)")]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class PNGImage(BaseModel):
    b64_json: str = Field(description="a PNG, base64")


class Served(BaseModel):
    """What every model's answer says about who served it and how long it took."""

    created: int
    model: str
    version: str
    family: str
    latency_ms: float = Field(description="at the ingress, from the request to the response")
    replica_ms: float = Field(description="inside the model's replica")


def _example_png() -> str:
    """A bright square on black: what a client might upload."""
    image = np.zeros((SIDE, SIDE), np.uint8)
    image[8:20, 8:20] = 200
    return base64.b64encode(encode_png(image)).decode("ascii")


# ---- OpenAI Images API -----------------------------------------------------------------------------------

class ImageGenerationRequest(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "gan", "prompt": "sneakers", "n": 2, "seed": 1}]})

    model: str | None = Field(None, description="a served model, or 'auto' / absent: the latency/quality policy "
                                                "picks the model and its settings")
    prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS, pattern=PROMPT_PATTERN)] | None = Field(
        None, description="a Fashion-MNIST class name; empty: any class. With class_id, it must name the same "
                          "class or none")
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = 1
    size: Annotated[str, Field(pattern=r"^\d+x\d+$", description=(
        f"'{SIDE}x{SIDE}' or a multiple such as '{2 * SIDE}x{2 * SIDE}', up to "
        f"'{MAX_UPSCALE * SIDE}x{MAX_UPSCALE * SIDE}'"))] | None = None
    response_format: Literal["b64_json"] | None = None
    output_format: Literal["png"] | None = None
    class_id: ClassId | None = None
    seed: Seed | None = Field(None, description="absent: drawn, and reported in the response")
    sampler: Literal[SAMPLERS] | None = Field(None, description="diffusion only")
    steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] | None = Field(None, description="diffusion only")
    guidance_scale: Annotated[float, Field(ge=0, le=MAX_GUIDANCE_SCALE)] | None = Field(
        None, description="diffusion only")
    latency_slo_ms: Annotated[float, Field(gt=0, le=MAX_LATENCY_SLO_MS)] | None = Field(
        None, description="answer within this, or 504")
    user: Any = Field(None, description="accepted and ignored (OpenAI)")
    quality: Literal[QUALITY_VALUES] | None = Field(
        None, description="the policy's quality tier (OpenAI's own values are read as tiers)")
    goal: Literal[GOALS] | None = Field(
        None, description="auto: only models that can also do this (likelihood: flow, pixelcnn; latent: vae)")
    best_effort: bool | None = Field(None, description="nothing fits the SLO: the fastest model, not a 429")
    stream: bool | None = Field(None, description="answer with server-sent events (text/event-stream): partial "
                                                  "images, then one image_generation.completed per image")
    partial_images: Annotated[int, Field(ge=0, le=3)] | None = Field(
        None, description="with stream: previews per image (diffusion's x̂₀, PixelCNN's pixels so far; one-pass "
                          "models have none)")
    max_fd: Annotated[float, Field(gt=0)] | None = Field(None, description="auto: a quality floor")
    min_class_accuracy: Annotated[float, Field(ge=0, le=1)] | None = Field(None, description="auto: a quality floor")
    cascade: bool | None = Field(None, description="auto: the GAN first, diffusion for the images the judge fails")
    cascade_threshold: Annotated[float, Field(ge=0, le=1)] | None = Field(
        None, description="with cascade: the judge's confidence an image needs to skip diffusion (default 0.7)")
    style: Any = Field(None, description="accepted and ignored (OpenAI)")
    background: Any = Field(None, description="accepted and ignored (OpenAI)")
    moderation: Any = Field(None, description="accepted and ignored (OpenAI)")


class PolicyChoice(BaseModel):
    model: str
    settings: dict[str, Any]
    predicted_ms: float
    margin: float = Field(description="the safety factor on the prediction, learned from its errors")
    slo_ms: float
    reason: str
    actual_ms: float
    slo_met: bool


class ImagesResponse(Served):
    data: list[PNGImage]
    class_id: int
    class_name: str | None
    seed: int
    settings: dict[str, Any] = Field(description="the sampling settings used")
    policy: PolicyChoice | None = Field(description="what the latency/quality policy chose and why")


class ModelObject(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    family: str
    version: str
    path: Literal["one-pass", "iterative"]
    provider: str = Field(description="ONNX Runtime's execution provider")
    threads: int
    settings: dict[str, Any] = Field(description="the deployment's live user_config")
    operations: list[str] = Field(description="generate, and the family's own: interpolate, reconstruct (vae), "
                                              "likelihood (flow, pixelcnn)")
    metrics: dict[str, Any] = Field(description="quality from `genserve evaluate`: fd, class_accuracy, precision, "
                                                "recall, diversity_ratio, bits_per_dim / elbo_bits_per_dim, ...")
    latency: dict[str, Any] | None = Field(description="the latency profile measured at publish: ms_per_forward "
                                                       "(graph -> batch -> ms), machine, provider, threads")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelObject]


# ---- the families' own operations ------------------------------------------------------------------------

class InterpolationRequest(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "vae", "seeds": [1, 2], "frames": 6, "prompt": "sneaker"}]})

    model: ModelName | None = None
    seeds: Annotated[list[Seed], Field(min_length=2, max_length=2)] | None = Field(
        None, description="the ends: these seeds' prior latents (the images they generate with n = 1); slerp")
    images: Annotated[list[Image], Field(min_length=2, max_length=2)] | None = Field(
        None, description="or the ends: these images' encodings; lerp")
    frames: Annotated[int, Field(ge=MIN_FRAMES, le=MAX_FRAMES)] = Field(DEFAULT_FRAMES, description=(
        "images on the path, ends included"))
    prompt: Prompt | None = None
    class_id: ClassId | None = None


class InterpolationResponse(Served):
    data: list[PNGImage]
    class_id: int
    class_name: str | None
    settings: dict[str, Any] = Field(description="endpoints: seeds | images; path: slerp | lerp")


class ReconstructionRequest(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "vae", "images": [_example_png()]}]})

    model: ModelName | None = None
    images: Annotated[list[Image], Field(min_length=1, max_length=MAX_IMAGES)]
    prompt: Prompt | None = None
    class_id: ClassId | None = None


class Reconstruction(PNGImage):
    reconstruction_mse: float = Field(description="mean squared error per pixel on the [0, 1] scale: the "
                                                  "anomaly score, higher is more unusual")


class ReconstructionResponse(Served):
    data: list[Reconstruction]
    class_id: int
    class_name: str | None


class LikelihoodRequest(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "flow", "images": [_example_png()]}]})

    model: ModelName | None = None
    images: Annotated[list[Image], Field(min_length=1, max_length=MAX_IMAGES)]
    prompt: Prompt | None = None
    class_id: ClassId | None = None
    seed: Seed = Field(0, description="flow only: its dequantization noise")


class Likelihood(BaseModel):
    bits_per_dim: float = Field(description="-log2 p(x | class) / 784: exact (pixelcnn), or a one-sample "
                                            "dequantized estimate (flow)")
    complexity_bits_per_dim: float = Field(description="the image's zlib-compressed size in bits per pixel")
    anomaly_score: float = Field(description="bits_per_dim - complexity_bits_per_dim (Serrà et al. 2020): "
                                             "higher is more unusual")


class LikelihoodResponse(Served):
    data: list[Likelihood]
    class_id: int
    class_name: str | None
    seed: int | None = Field(None, description="flow only: the dequantization noise used")


# ---- KServe v2 ---------------------------------------------------------------------------------------------

class V2Error(BaseModel):
    """Every error under /v2, with its HTTP status: KServe v2's (and Triton's) shape."""

    error: str


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool
    not_ready: dict[str, str] | None = Field(None, description="503: each model that is not ready, and why")


class V2ModelReady(BaseModel):
    name: str
    ready: bool


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any size")


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2ModelConfig(BaseModel):
    """Triton's model configuration (its /config extension)."""

    name: str
    platform: str
    backend: str
    max_batch_size: int
    input: list[dict[str, Any]]
    output: list[dict[str, Any]]


class V2Statistics(BaseModel):
    """Triton's model statistics (its /stats extension), of this ingress replica's v2 requests."""

    model_stats: list[dict[str, Any]]


class V2InputParameters(Strict):
    binary_data_size: Annotated[int, Field(ge=0)] | None = Field(
        None, description="binary tensor extension: the tensor's bytes follow the JSON part of the body")


class V2InputTensor(Strict):
    name: Literal[tuple(kserve.INPUTS)]
    datatype: Literal["INT64"]
    shape: Annotated[list[Annotated[int, Field(ge=1, le=MAX_N)]], Field(min_length=1, max_length=1)] = Field(
        description="[n]: one element per image")
    data: list[int] | None = Field(None, description=f"{kserve.CLASS_ID}: 0..{MAX_CLASS_ID}; {kserve.SEED}: "
                                                     f"0..{MAX_SEED} (absent with binary_data_size)")
    parameters: V2InputParameters | None = None


class V2OutputParameters(Strict):
    binary_data: bool | None = Field(None, description="the output as raw bytes after the JSON part")


class V2RequestedOutput(Strict):
    name: Literal[tuple(kserve.OUTPUTS)]
    parameters: V2OutputParameters | None = None


class V2Parameters(Strict):
    """A v2 inference request's parameters: the OpenAI body's extras, Triton's timeout and the binary default."""

    sampler: Literal[SAMPLERS] | None = Field(None, description="diffusion only")
    steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] | None = Field(None, description="diffusion only")
    guidance_scale: Annotated[float, Field(ge=0, le=MAX_GUIDANCE_SCALE)] | None = Field(
        None, description="diffusion only")
    latency_slo_ms: Annotated[float, Field(gt=0, le=MAX_LATENCY_SLO_MS)] | None = None
    timeout: Annotated[int, Field(ge=0, le=MAX_TIMEOUT_US)] | None = Field(None, description="Triton's, in "
                                                                                           "microseconds; 0 = none")
    quality: Literal[QUALITY_VALUES] | None = None
    goal: Literal[GOALS] | None = None
    best_effort: bool | None = None
    max_fd: Annotated[float, Field(gt=0)] | None = None
    min_class_accuracy: Annotated[float, Field(ge=0, le=1)] | None = None
    cascade: bool | None = None
    cascade_threshold: Annotated[float, Field(ge=0, le=1)] | None = None
    binary_data_output: bool | None = Field(None, description="every output as raw bytes, unless it says otherwise")


class V2InferRequest(Strict):
    id: str | None = None
    parameters: V2Parameters | None = None
    inputs: list[V2InputTensor]
    outputs: list[V2RequestedOutput] | None = None


class V2OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[int] | None = Field(None, description="absent when sent as binary data")
    parameters: dict[str, Any] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str
    parameters: dict[str, Any] = Field(description="family, the sampling settings used, the drawn seed, the "
                                                   "policy's account (a JSON string)")
    outputs: list[V2OutputTensor]


_INFER_ERRORS = (400, 404, 429, 503, 504)
# route (without /versions/{version}) -> (request body, the 200's body, {other status: its body}); an error
# status's body is V2Error unless given
V2_ROUTES: dict[tuple[str, str], tuple[type[BaseModel] | None, type[BaseModel], dict[int, type[BaseModel]]]] = {
    ("get", "/v2"): (None, V2ServerMetadata, {}),
    ("get", "/v2/health/live"): (None, V2Live, {}),
    ("get", "/v2/health/ready"): (None, V2Ready, {503: V2Ready}),
    ("get", "/v2/models/stats"): (None, V2Statistics, {}),
    ("get", "/v2/models/{model}"): (None, V2ModelMetadata, {404: V2Error}),
    ("get", "/v2/models/{model}/ready"): (None, V2ModelReady, {404: V2Error, 503: V2ModelReady}),
    ("get", "/v2/models/{model}/config"): (None, V2ModelConfig, {404: V2Error}),
    ("get", "/v2/models/{model}/stats"): (None, V2Statistics, {404: V2Error}),
    ("post", "/v2/models/{model}/infer"): (V2InferRequest, V2InferResponse, dict.fromkeys(_INFER_ERRORS, V2Error)),
}


# ---- wiring ------------------------------------------------------------------------------------------------

_ERRORS = {400: "invalid request", 404: "unknown model", 503: "overloaded or cancelled (Retry-After)",
           504: "deadline exceeded"}
GENERATION_ERRORS = (400, 404, 429, 503, 504)  # a generation is admitted by the policy: 429 when none fits its SLO
_STATUS_TEXT = {**_ERRORS, 401: "no API key, or a wrong one (only when the server is given one)",
                413: "the request body is larger than the server takes",
                414: "the request's path and query are longer than the server takes",
                431: "the request's headers are larger than the server takes",
                429: "no model can meet the latency SLO (Retry-After when waiting helps)"}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying, where waiting helps",
                                "schema": {"type": "string"}}}


def describe(request: type[BaseModel] | None, response: type[BaseModel], *errors: int, streams: bool = False
             ) -> dict[str, Any]:
    """Route decorator arguments: `request` as the JSON body, `response` for 200 (streams: or server-sent
    events), and ErrorResponse for each status in errors (default: 400, 404, 503, 504)."""
    kwargs: dict[str, Any] = {"responses": {200: {"model": response}, **{
        status: {"model": ErrorResponse, "description": _STATUS_TEXT.get(status, "error")}
        for status in errors or tuple(_ERRORS)}}}
    if streams:
        kwargs["responses"][200]["content"] = {"text/event-stream": {"schema": {
            "type": "string", "description": "with stream: true, server-sent events: image_generation.partial_image, "
                                             "image_generation.completed, or error (OpenAI's error body)"}}}
    if request is not None:
        _REQUEST_MODELS.append(request)
        kwargs["openapi_extra"] = {"requestBody": {"required": True, "content": {"application/json": {
            "schema": _ref(request)}}}}
    return kwargs


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _describe_v2(path: str, method: str, operation: dict[str, Any]) -> None:
    """A v2 operation's request body and responses, from V2_ROUTES."""
    request, response, others = V2_ROUTES[(method, path.replace("/versions/{version}", ""))]
    responses = {"200": _json(response, "success")}
    if response is V2InferResponse:  # the binary tensor extension: JSON, then the tensors' bytes
        responses["200"]["content"]["application/octet-stream"] = {"schema": {
            "type": "string", "format": "binary", "description": "Inference-Header-Content-Length bytes of JSON "
                                                                 "(V2InferResponse), then the binary outputs"}}
    for status, model in others.items():
        responses[str(status)] = _json(model, _STATUS_TEXT.get(status, "error"))
    if "400" in operation.get("responses", {}) or "422" in operation.get("responses", {}):
        responses["400"] = _json(V2Error, _STATUS_TEXT[400])   # FastAPI's own checks of the path
    operation["responses"] = responses
    if request is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(request)}}}


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document for the app's routes, plus the request bodies' schemas and KServe v2's responses,
    less what this app never answers (FastAPI's 422: its validation errors are answered as 400 here), and
    with what every route may answer besides: 414 and 431 (the request's size), 413 to an operation that takes
    a body; with an API key
    configured (GENSERVE_API_KEY), the bearer scheme and a 401 on every operation but the open ones."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=DESCRIPTION, routes=app.routes)
    v2_requests = [r for r, _, _ in V2_ROUTES.values() if r is not None]
    v2_responses = {m for _, r, others in V2_ROUTES.values() for m in (r, *others.values())}
    _, defs = models_json_schema([(m, "validation") for m in (*_REQUEST_MODELS, *v2_requests)]
                                 + [(m, "serialization") for m in sorted(v2_responses, key=lambda m: m.__name__)],
                                 ref_template="#/components/schemas/{model}")
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(defs.get("$defs", {}))
    key = auth.api_key()
    for path, operations in doc["paths"].items():
        v2 = path == "/v2" or path.startswith("/v2/")
        error = V2Error if v2 else ErrorResponse
        for method, operation in operations.items():
            if v2:
                _describe_v2(path, method, operation)
            responses = operation.setdefault("responses", {})
            if responses.pop("422", None) is not None:
                responses.setdefault("400", _json(error, _STATUS_TEXT[400]))
            for status in (414, 431) + ((413,) if "requestBody" in operation else ()):
                responses[str(status)] = _json(error, _STATUS_TEXT[status])
            for status in ("429", "503"):
                if status in responses:
                    responses[status]["headers"] = _RETRY_AFTER
            if key is not None and not auth.is_open(path):
                responses["401"] = _json(error, _STATUS_TEXT[401])
                operation["security"] = [{"bearer": []}]
    if key is not None:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer", "description": (
            "GENSERVE_API_KEY: every route but the health ones and the static pages")}}
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas.setdefault("ErrorResponse", ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}"))
    schemas.setdefault("ErrorBody", ErrorBody.model_json_schema())
    schemas.setdefault("V2Error", V2Error.model_json_schema())
    app.openapi_schema = doc
    return app.openapi_schema
