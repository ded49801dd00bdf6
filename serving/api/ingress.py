"""The ingress deployment: HTTP in (FastAPI on Serve's proxy), validated jobs out to the model deployments,
images back as PNG. Every error is answered in OpenAI's shape; bad input is a 4xx, never a traceback.

Imports no runtime and no torch: the model deployments hold the sessions and the engine. No
`from __future__ import annotations` here: FastAPI reads the route signatures' types at runtime, and
Serve's ingress wrapping hides this module's names from it (a stringified `Request` became a 422).
"""
import asyncio
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError, RequestCancelledError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.api.jobs import GenerationResult
from serving.api.openai import APIError, ImageRequest, images_response, models_response, parse_image_request

logger = logging.getLogger("ray.serve")

# Errors a model deployment raises on purpose, by class name: the iterative engine's live in serving.engine,
# which imports torch, and the ingress stays torch-free.
_REQUEST_ERRORS = {"DeadlineExceeded": (504, "timeout_error", "deadline_exceeded"),
                   "RequestCancelled": (503, "server_error", "request_cancelled"),
                   "EngineStopped": (503, "server_error", "engine_stopped")}

api = FastAPI(title="genserve", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and methods, in OpenAI's shape too."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(APIError(exc.status_code, str(exc.detail), code=code).body(), status_code=exc.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own parameter checks (path parameters): a 400, not its default 422."""
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    err = APIError(400, f"{param or 'request'}: {first.get('msg', 'invalid request')}", param=param)
    return JSONResponse(err.body(), status_code=400)


@api.exception_handler(Exception)
async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("genserve ingress: unexpected error")
    err = APIError(500, f"internal error: {type(exc).__name__}", type="server_error", code="internal_error")
    return JSONResponse(err.body(), status_code=500)


def _decode_json(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(api)
class Ingress:
    def __init__(self, models: dict[str, DeploymentHandle], families: dict[str, str], default_model: str,
                 timeout_s: float):
        """models: name -> handle of its deployment; families: name -> family (from the store at build)."""
        self.models, self.families = models, families
        self.default_model, self.timeout_s = default_model, timeout_s

    @api.post("/v1/images/generations")
    async def generations(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        req = parse_image_request(_decode_json(await request.body()), self.families, self.default_model)
        result = await self._generate(req)
        return JSONResponse(images_response(req, result, (time.perf_counter() - start) * 1000))

    @api.get("/v1/models")
    async def list_models(self) -> JSONResponse:
        infos = await asyncio.gather(*(h.info.remote() for h in self.models.values()))
        return JSONResponse(models_response(list(infos)))

    @api.get("/v1/models/{model_id}")
    async def retrieve_model(self, model_id: str) -> JSONResponse:
        if model_id not in self.models:
            raise APIError(404, f"the model {model_id!r} does not exist; served models: {', '.join(sorted(self.models))}",
                           param="model", code="model_not_found")
        info = await self.models[model_id].info.remote()
        return JSONResponse(models_response([info])["data"][0])

    async def _generate(self, req: ImageRequest) -> GenerationResult:
        """One call to the model's deployment, bounded by the request's SLO (else the ingress timeout)."""
        timeout = req.job.timeout_s or self.timeout_s
        response = self.models[req.model].generate.remote(req.job)
        try:
            return await asyncio.wait_for(response, timeout)  # a DeploymentResponse is awaitable
        except TimeoutError:
            response.cancel()  # the job leaves the model's queue (or the engine's batch) too
            raise APIError(504, f"{req.model} did not answer within {timeout * 1000:.0f} ms", type="timeout_error",
                           code="deadline_exceeded") from None
        except BackPressureError:
            raise APIError(503, f"{req.model} is at capacity; retry shortly", type="server_error",
                           code="overloaded") from None
        except RequestCancelledError:
            raise APIError(503, f"the request to {req.model} was cancelled", type="server_error",
                           code="request_cancelled") from None
        except Exception as exc:
            cause = getattr(exc, "cause", None) or exc  # a RayTaskError carries the replica's exception
            if type(cause).__name__ in _REQUEST_ERRORS:
                status, kind, code = _REQUEST_ERRORS[type(cause).__name__]
                raise APIError(status, str(cause), type=kind, code=code) from None
            if isinstance(cause, ValueError):  # a check the deployment makes (the API checks first)
                raise APIError(400, str(cause)) from None
            logger.exception("genserve ingress: %s failed", req.model)
            raise APIError(500, f"{req.model} failed: {type(cause).__name__}: {cause}", type="server_error",
                           code="model_error") from None
