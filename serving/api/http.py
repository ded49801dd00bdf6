"""The ingress's FastAPI app and its error handlers, shared by every HTTP protocol. Each protocol's routes are
an APIRouter in their own module (openai_routes.py, ...), included by ingress.py; a route reaches the
running ingress.Ingress (model handles, the call to a model) through `current_ingress`. Every error is
answered in the API's own shape; bad input is a 4xx, never a traceback.

No `from __future__ import annotations` here or in the route modules: FastAPI reads the route signatures'
types at runtime, and Serve's ingress wrapping hides the modules' names from it (a stringified `Request`
became a 422)."""
import json
import logging

from fastapi import FastAPI, Request
from ray import serve
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.api.errors import APIError
from serving.api.openapi import openapi_document
from serving.observability import note_error_code
from serving.observability.http import observe_http

logger = logging.getLogger("ray.serve")

def current_ingress():
    """FastAPI dependency: this replica's Ingress instance (plain functions, not Serve's class-based routes,
    so a protocol's routes can live in their own module)."""
    return serve.get_replica_context().servable_object


api = FastAPI(title="genserve", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
api.openapi = lambda: openapi_document(api)  # request bodies described by schema models (serving/api/openapi.py)
api.middleware("http")(observe_http)  # request duration by model, route, protocol and status


def _error(request: Request, err: APIError, headers: dict | None = None) -> JSONResponse:
    """An error in the shape of the protocol the route belongs to: KServe v2's {"error": message} under /v2,
    OpenAI's everywhere else."""
    body = err.v2_body() if request.url.path.startswith("/v2") else err.body()
    return JSONResponse(body, status_code=err.status, headers=headers)


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    note_error_code(exc.code)  # the reason label of a 429/503 rejection
    return _error(request, exc, exc.headers())


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and methods, in the API's shape too."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return _error(request, APIError(exc.status_code, str(exc.detail), code=code))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own parameter checks (path parameters): a 400, not its default 422."""
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    err = APIError(400, f"{param or 'request'}: {first.get('msg', 'invalid request')}", param=param)
    return _error(request, err)


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("genserve ingress: unexpected error")
    err = APIError(500, f"internal error: {type(exc).__name__}", code="internal_error")
    return _error(request, err)


def decode_json(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
