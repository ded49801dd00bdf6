"""The OpenAI Images API's routes: POST /v1/images/generations, GET /v1/models[/{id}]. Included in the
ingress's app by ingress.py; each route reaches the running Ingress through `current_ingress`."""
import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from serving.api import openapi as schema
from serving.api.http import current_ingress, decode_json
from serving.api.errors import APIError
from serving.api.openai import ImageRequest, images_response, models_response, parse_image_request, policy_headers, stream_events
from serving.api.validation import check_model

router = APIRouter()


@router.post("/v1/images/generations", summary="Generate images (OpenAI Images API)",
             **schema.describe(schema.ImageGenerationRequest, schema.ImagesResponse, *schema.GENERATION_ERRORS,
                               streams=True))
async def generations(request: Request, ingress=Depends(current_ingress)) -> JSONResponse:
    start = time.perf_counter()
    req = parse_image_request(decode_json(await request.body()), ingress.families)
    if req.stream:
        events = ingress.generate_stream(req.model, [req.job], req.hints)
        first = await anext(events)  # admission and the first event: until here an error is a plain 4xx / 5xx
        return StreamingResponse(_server_sent(req, first, events, start), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    [result] = await ingress.generate(req.model, [req.job], req.hints)
    return JSONResponse(images_response(req, result, (time.perf_counter() - start) * 1000),
                        headers=policy_headers(result))


@router.get("/v1/models", summary="The served models: family, version, operations, quality, latency profile",
            **schema.describe(None, schema.ModelList, 503))
async def list_models(ingress=Depends(current_ingress)) -> JSONResponse:
    infos = await asyncio.gather(*(h.info.remote() for h in ingress.models.values()))
    return JSONResponse(models_response(list(infos)))


@router.get("/v1/models/{model_id}", summary="One served model",
            **schema.describe(None, schema.ModelObject, 404, 503))
async def retrieve_model(model_id: str, ingress=Depends(current_ingress)) -> JSONResponse:
    check_model(model_id, ingress.models)
    info = await ingress.models[model_id].info.remote()
    return JSONResponse(models_response([info])["data"][0])


async def _server_sent(req: ImageRequest, first, events: AsyncIterator, start: float) -> AsyncIterator[str]:
    """The stream's events as server-sent events (`event: <type>` + `data: <json>`); an error after the first
    event is an `error` event with OpenAI's error body. Closing it (the client went away) closes `events`,
    which cancels the model call."""
    async with aclosing(events):
        try:
            _, event = first
            while True:
                for frame in stream_events(req, event, (time.perf_counter() - start) * 1000):
                    yield f"event: {frame['type']}\ndata: {json.dumps(frame)}\n\n"
                _, event = await anext(events)
        except StopAsyncIteration:
            return
        except APIError as err:
            yield f"event: error\ndata: {json.dumps(err.body())}\n\n"
