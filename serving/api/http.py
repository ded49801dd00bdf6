"""The ingress's FastAPI app and its error handlers, shared by every HTTP protocol. Each protocol's routes are
an APIRouter in their own module (openai_routes.py, ...), included by ingress.py; a route reaches the
running ingress.Ingress (model handles, the call to a model) through `current_ingress`. Every error is
answered in the API's own shape; bad input is a 4xx, never a traceback.

Before any route: the API key when one is configured (serving/api/auth.py: a 401), and the request's size
limits (serving/api/validation.py): its headers (431), its path and query (414), its body (413, from the
Content-Length header or as the body arrives). JSON bodies go through `decode_json`, which
refuses what json.loads would take but no client means (NaN, duplicate keys, lone surrogates, deep nesting).

No `from __future__ import annotations` here or in the route modules: FastAPI reads the route signatures'
types at runtime, and Serve's ingress wrapping hides the modules' names from it (a stringified `Request`
became a 422)."""
import json
import logging
import re

import numpy as np
from fastapi import FastAPI, Request
from ray import serve
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.api import auth
from serving.api.errors import APIError
from serving.api.openapi import openapi_document
from serving.api.validation import MAX_HEADER_BYTES, MAX_JSON_DEPTH, MAX_URL_BYTES, max_body_bytes
from serving.observability import note_error_code
from serving.observability.http import ObserveHTTP

logger = logging.getLogger("ray.serve")

async def current_ingress():
    """FastAPI dependency: this replica's Ingress instance (plain functions, not Serve's class-based routes,
    so a protocol's routes can live in their own module). Async: FastAPI runs a plain `def` dependency in its
    thread pool, a thread hop on every request (4-10% of the ingress's CPU under load, profiled)."""
    return serve.get_replica_context().servable_object


def route_path(scope: dict) -> str:
    """The request's path within the app: without the root path a Serve route_prefix puts before it."""
    path, root = scope["path"], scope.get("root_path", "")
    return (path[len(root):] or "/") if root and path.startswith(root) else path


def error_response(scope: dict, err: APIError) -> JSONResponse:
    """An error in the shape of the protocol the route belongs to: KServe v2's {"error": message} under /v2,
    OpenAI's everywhere else; with its headers (Retry-After, WWW-Authenticate)."""
    path = route_path(scope)
    body = err.v2_body() if path == "/v2" or path.startswith("/v2/") else err.body()
    return JSONResponse(body, status_code=err.status, headers=err.headers())


class RequestLimits:
    """ASGI middleware: headers over MAX_HEADER_BYTES in all are a 431, a path and query over MAX_URL_BYTES a
    414, and other than one Host header a 400 (Serve's proxy lets all three through). A body over
    `body_limit` bytes is a 413, at once when its Content-Length says so, else (a chunked body, or a
    Content-Length that lies) as soon as the bytes received pass the limit: the route reading the body gets
    the APIError, which its protocol renders."""

    def __init__(self, app, body_limit: int):
        self.app, self.limit = app, body_limit

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than this server takes ({self.limit} bytes)",
                        code="body_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if err := self._refused_at_once(scope):
            return await error_response(scope, err)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)

    def _refused_at_once(self, scope) -> APIError | None:
        header_bytes = sum(len(name) + len(value) + 4 for name, value in scope["headers"])  # "name: value\r\n"
        if header_bytes > MAX_HEADER_BYTES:
            return APIError(431, f"the request's headers take {header_bytes} bytes; this server takes at most "
                                 f"{MAX_HEADER_BYTES}", code="headers_too_large")
        url_bytes = len(scope.get("raw_path") or scope["path"].encode()) + len(scope.get("query_string", b""))
        if url_bytes > MAX_URL_BYTES:
            return APIError(414, f"the request's path and query take {url_bytes} bytes; this server takes at most "
                                 f"{MAX_URL_BYTES}", code="uri_too_long")
        hosts = sum(name == b"host" for name, _ in scope["headers"])
        if hosts > 1 or (hosts == 0 and scope.get("http_version") == "1.1"):   # RFC 9112, 3.2: a 400
            return APIError(400, f"an HTTP/1.1 request takes exactly one Host header, got {hosts}",
                            code="invalid_host")
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > self.limit:
            return self._too_large()
        return None


class RequireKey:
    """ASGI middleware: with an API key configured (serving/api/auth.py), a 401 for a request to any route
    but the open ones that lacks it, before its body is read."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and auth.api_key() is not None and not auth.is_open(route_path(scope)):
            try:
                auth.check_authorization(Headers(scope=scope).get("authorization"))
            except APIError as err:
                return await error_response(scope, err)(scope, receive, send)
        await self.app(scope, receive, send)


api = FastAPI(title="genserve", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
api.openapi = lambda: openapi_document(api)  # request bodies described by schema models (serving/api/openapi.py)
# The last added runs first: metrics see every answer, the key is checked before the body is read
api.add_middleware(RequestLimits, body_limit=max_body_bytes())
api.add_middleware(RequireKey)
api.add_middleware(ObserveHTTP)  # request duration by model, route, protocol and status


def _error(request: Request, err: APIError) -> JSONResponse:
    return error_response(request.scope, err)


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    note_error_code(exc.code)  # the reason label of a 429/503 rejection
    return _error(request, exc)


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


# ---- JSON bodies -------------------------------------------------------------------------------------------

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)   # a JSON string, escapes and all
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def decode_json(raw: bytes) -> object:
    """A request body as JSON, or a 400 (code invalid_json) for what is not JSON, and for what json.loads
    would take but no client means and the code after it should never see: nesting deeper than
    MAX_JSON_DEPTH (json.loads recurses, and a deep enough body would crash it), NaN and ±Infinity (not JSON),
    a key given twice (which one wins is up to the parser), a lone UTF-16 surrogate (no UTF-8 response can
    quote it back)."""
    if (depth := json_depth(raw)) > MAX_JSON_DEPTH:
        raise APIError(400, f"the request body nests {depth} deep; at most {MAX_JSON_DEPTH} levels of JSON "
                            "arrays and objects are taken", code="invalid_json")
    try:
        value = json.loads(raw, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(value):
        raise APIError(400, "the request body is not valid JSON: a string holds a lone UTF-16 surrogate "
                            "(\\ud800-\\udfff without its pair)", code="invalid_json")
    return value


def json_depth(raw: bytes) -> int:
    """How deep a JSON text's arrays and objects nest, counted without parsing it (brackets inside strings
    skipped). A text with at most MAX_JSON_DEPTH opening brackets gets their count, a bound that is enough."""
    opening = raw.count(b"[") + raw.count(b"{")
    if opening <= MAX_JSON_DEPTH:
        return opening
    brackets = np.frombuffer(_STRING.sub(b"", raw).translate(None, _NOT_BRACKET), np.uint8)
    if not brackets.size:
        return 0
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def _no_constant(name: str):
    raise APIError(400, f"the request body is not valid JSON: {name} is not a JSON number (numbers must be "
                        "finite)", code="invalid_json")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    value = dict(pairs)
    if len(value) != len(pairs):
        keys = [k for k, _ in pairs]
        duplicate = next(k for i, k in enumerate(keys) if k in keys[:i])
        raise APIError(400, f"the request body gives the key {duplicate!r} twice in one object",
                       code="invalid_json")
    return value


def _has_lone_surrogate(value: object) -> bool:
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False
