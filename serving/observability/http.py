"""The HTTP side of request metrics: a middleware on the ingress's FastAPI app (serving/api/http.py) that
wraps every request in observe_request, labelled with its protocol and its route's template (never the raw
path: model names and junk URLs would make unbounded label values)."""
from serving.observability.metrics import observe_request

UNMATCHED = "unmatched"  # the route label of a request no route took (a 404)


def protocol_of(path: str) -> str:
    if path.startswith("/v1/"):
        return "openai"
    if path.startswith("/v2/") or path == "/v2":
        return "kserve"
    return "http"


class ObserveHTTP:
    """ASGI middleware (`api.add_middleware(ObserveHTTP)`): every HTTP request in observe_request, its status
    read from the response as it starts. Pure ASGI, not Starlette's BaseHTTPMiddleware, which costs every
    request an extra task and a memory stream (and runs the route in another context)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        with observe_request(protocol_of(scope["path"]), UNMATCHED) as req:
            async def send_noting_status(message):
                if message["type"] == "http.response.start":
                    req.status = message["status"]
                await send(message)

            try:
                await self.app(scope, receive, send_noting_status)
            finally:  # routing has set scope["route"] by now, even when the route raised
                req.route = getattr(scope.get("route"), "path", UNMATCHED)
