"""The HTTP side of request metrics: a middleware on the ingress's FastAPI app (serving/api/http.py) that
wraps every request in observe_request, labelled with its protocol and its route's template (never the raw
path: model names and junk URLs would make unbounded label values)."""
from fastapi import Request, Response

from serving.observability.metrics import observe_request

UNMATCHED = "unmatched"  # the route label of a request no route took (a 404)


def protocol_of(path: str) -> str:
    if path.startswith("/v1/"):
        return "openai"
    if path.startswith("/v2/") or path == "/v2":
        return "kserve"
    return "http"


async def observe_http(request: Request, call_next) -> Response:
    """FastAPI HTTP middleware (`api.middleware("http")(observe_http)`)."""
    with observe_request(protocol_of(request.url.path), UNMATCHED) as req:
        try:
            response = await call_next(request)
        finally:  # routing has set scope["route"] by now, even when the route raised
            route = request.scope.get("route")
            req.route = getattr(route, "path", UNMATCHED)
        req.status = response.status_code
        return response
