"""The one error type of the public APIs, and how each protocol answers it.

Anything at the edge (a parser, the policy's admission, a model call) raises `APIError(status, message)`;
the route's protocol renders it: OpenAI's {"error": {message, type, param, code}} for /v1 and the
families' operations, KServe v2's {"error": message} under /v2 (HTTP), a status code and the message for
gRPC. 4xx is the client's fault, 5xx ours, and the message never carries a traceback."""
from __future__ import annotations

import functools
import math
from typing import Any

# OpenAI's error `type` by HTTP status; a status not listed takes its class's (4xx, 5xx)
ERROR_TYPES = {429: "rate_limit_error", 504: "timeout_error"}
_CLASS_TYPES = {4: "invalid_request_error", 5: "server_error"}

# gRPC status (a grpc.StatusCode name) by HTTP status; anything else is INTERNAL
GRPC_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED",
               429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
GRPC_STATUS_BY_CODE = {"overloaded": "RESOURCE_EXHAUSTED"}  # a replica at capacity: the client should back off
# A message quotes what the client sent (a value, a name): the longest one answered, so that a megabyte
# value is not echoed back whole
MAX_MESSAGE_CHARS = 1000
_CUT = " ... (cut short)"


def error_type(status: int) -> str:
    """OpenAI's `type` for an HTTP status: invalid_request_error (4xx), rate_limit_error (429),
    timeout_error (504), server_error (other 5xx)."""
    return ERROR_TYPES.get(status) or _CLASS_TYPES.get(status // 100, "server_error")


class APIError(Exception):
    """An error answered with `status`; 4xx is the client's, 5xx ours. `type` defaults to the status's
    (error_type); `param` names the request field at fault, `code` is a stable machine-readable reason."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, retry_after_s: float | None = None):
        message, param = _printable(message), None if param is None else _printable(param)
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or error_type(status)
        self.retry_after_s = retry_after_s  # a 429 / 503's Retry-After; None: retrying later will not help

    def __reduce__(self):
        """Pickled whole (Ray carries exceptions between processes): the default would rebuild it from its
        message alone, which its constructor refuses."""
        return (functools.partial(APIError, self.status, self.message, type=self.type, param=self.param,
                                  code=self.code, retry_after_s=self.retry_after_s), ())

    def headers(self) -> dict[str, str] | None:
        """Retry-After (whole seconds, rounded up) on a 429 that waiting helps, and on every 503;
        WWW-Authenticate on a 401 (RFC 6750: the API takes a bearer token)."""
        if self.status == 401:
            return {"WWW-Authenticate": "Bearer"}
        if self.retry_after_s is not None:
            return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}
        return {"Retry-After": "1"} if self.status == 503 else None

    def body(self) -> dict[str, Any]:
        """OpenAI's shape: every route outside /v2."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def v2_body(self) -> dict[str, Any]:
        """KServe v2's (and Triton's) shape over HTTP."""
        return {"error": self.message}

    def grpc_status(self) -> str:
        """The gRPC status code's name (grpc.StatusCode.<name>) that answers this error."""
        return GRPC_STATUS_BY_CODE.get(self.code) or GRPC_STATUS.get(self.status, "INTERNAL")


def _printable(message: str) -> str:
    """The text cut to MAX_MESSAGE_CHARS, with what UTF-8 cannot encode (a lone surrogate quoted from the
    client's JSON) escaped: every response body is UTF-8."""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS - len(_CUT)] + _CUT
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


def invalid(param: str | None, message: str, code: str = "invalid_value") -> APIError:
    """400: the request's `param` is wrong; the message names it and the value."""
    return APIError(400, message, param=param, code=code)


def model_not_found(message: str) -> APIError:
    """404: no such model (or version)."""
    return APIError(404, message, param="model", code="model_not_found")
