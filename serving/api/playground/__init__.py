"""The playground: one plain HTML page at / with its script and style sheet beside it (no build step),
calling the same JSON APIs as any client: the OpenAI generations, GET /v1/models and the families' own
operations. Included in the ingress's app by ingress.py."""
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from serving.api.errors import APIError
from serving.api.openapi import ErrorResponse

HERE = Path(__file__).resolve().parent
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}  # file -> media type

router = APIRouter()


@router.get("/", response_class=HTMLResponse, summary="The playground page")
async def page() -> HTMLResponse:
    return HTMLResponse((HERE / "index.html").read_text())


@router.get("/playground/{name}", response_class=Response, summary="The playground's script and style sheet",
            responses={200: {"content": {media: {} for media in ASSETS.values()}},
                       404: {"model": ErrorResponse, "description": "no such file"}})
async def asset(name: str) -> Response:
    if name not in ASSETS:
        raise APIError(404, f"no playground file {name!r}; there are {', '.join(ASSETS)}", param="name",
                       code="not_found")
    return Response((HERE / name).read_bytes(), media_type=ASSETS[name])
