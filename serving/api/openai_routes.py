"""The OpenAI Images API's routes: POST /v1/images/generations, GET /v1/models[/{id}]. Included in the
ingress's app by ingress.py; each route reaches the running Ingress through `current_ingress`."""
import asyncio
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from serving.api import openapi as schema
from serving.api.http import current_ingress, decode_json
from serving.api.openai import images_response, models_response, parse_image_request, policy_headers
from serving.api.validation import check_model

router = APIRouter()


@router.post("/v1/images/generations", summary="Generate images (OpenAI Images API)",
             **schema.describe(schema.ImageGenerationRequest, schema.ImagesResponse, *schema.GENERATION_ERRORS))
async def generations(request: Request, ingress=Depends(current_ingress)) -> JSONResponse:
    start = time.perf_counter()
    req = parse_image_request(decode_json(await request.body()), ingress.families)
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
