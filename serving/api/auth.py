"""The optional API key. With GENSERVE_API_KEY set in the replicas' environment, every API route answers only
requests that carry `Authorization: Bearer <key>` — what the openai client sends for its api_key, what
tritonclient sends given headers=, and over gRPC the `authorization` metadata — and any other request a 401
in the API's own shape (gRPC: UNAUTHENTICATED). The key is compared in constant time. Unset or empty, nothing
is checked.

Open without the key, so that a load balancer or Kubernetes can probe a replica it holds no key for: KServe
v2's health API (HTTP /v2/health/live, /v2/health/ready, /v2/models/{m}[/versions/{v}]/ready; gRPC
ServerLive, ServerReady, ModelReady), and the static documents (the playground page at / and its files,
/openapi.json). Serve's own /-/healthz and /-/routes and the Prometheus metrics port are outside the app
and are not guarded either: keep those ports off the public network."""
from __future__ import annotations

import hmac
import os
import re

from serving.api.errors import APIError

API_KEY_ENV = "GENSERVE_API_KEY"
OPEN_RPCS = frozenset({"ServerLive", "ServerReady", "ModelReady"})   # gRPC methods open without the key
_OPEN_PATH = re.compile(r"/|/openapi\.json|/playground/[^/]+|/v2/health/(?:live|ready)"
                        r"|/v2/models/[^/]+(?:/versions/[^/]+)?/ready")


def api_key() -> str | None:
    """The key the API requires, None when it requires none."""
    return os.environ.get(API_KEY_ENV) or None


def is_open(path: str) -> bool:
    """Whether an HTTP route path (the app's own, without a route prefix) is answered without the key."""
    return _OPEN_PATH.fullmatch(path) is not None


def check_authorization(header: str | None) -> None:
    """Raise a 401 APIError unless `header` (the Authorization header, or the gRPC `authorization` metadata)
    is `Bearer <key>` with the configured key; with no key configured, return."""
    key = api_key()
    if key is None:
        return
    if not header:
        raise APIError(401, "this server requires an API key: send the header 'Authorization: Bearer <key>'",
                       code="missing_api_key")
    scheme, _, token = header.partition(" ")
    # compare_digest's time depends only on the lengths, never on where the two first differ
    if not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())):
        raise APIError(401, "invalid API key: send the header 'Authorization: Bearer <key>' with the server's key",
                       code="invalid_api_key")
