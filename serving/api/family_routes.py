"""The families' own operations' routes: POST /v1/images/interpolations, /v1/images/reconstructions (vae)
and /v1/likelihood (flow, pixelcnn). Included in the ingress's app by ingress.py; requests and responses
are serving.api.family_ops, the work is the model deployment's method of the same name."""
import time
from collections.abc import Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from serving.api import family_ops as ops
from serving.api import openapi as schema
from serving.api.http import current_ingress, decode_json

router = APIRouter()


async def _operate(request: Request, ingress, parse: Callable, respond: Callable) -> JSONResponse:
    start = time.perf_counter()
    req = parse(decode_json(await request.body()), ingress.families)
    result = await ingress.operate(req.model, req.method, req.job)
    return JSONResponse(respond(req, result, (time.perf_counter() - start) * 1000))


@router.post("/v1/images/interpolations", summary="Latent interpolation (vae)",
             **schema.describe(schema.InterpolationRequest, schema.InterpolationResponse))
async def interpolations(request: Request, ingress=Depends(current_ingress)) -> JSONResponse:
    return await _operate(request, ingress, ops.parse_interpolation, ops.interpolation_response)


@router.post("/v1/images/reconstructions", summary="Reconstruction and its anomaly score (vae)",
             **schema.describe(schema.ReconstructionRequest, schema.ReconstructionResponse))
async def reconstructions(request: Request, ingress=Depends(current_ingress)) -> JSONResponse:
    return await _operate(request, ingress, ops.parse_reconstruction, ops.reconstruction_response)


@router.post("/v1/likelihood", summary="Exact log-likelihood in bits/dim (flow, pixelcnn)",
             **schema.describe(schema.LikelihoodRequest, schema.LikelihoodResponse))
async def likelihood(request: Request, ingress=Depends(current_ingress)) -> JSONResponse:
    return await _operate(request, ingress, ops.parse_likelihood, ops.likelihood_response)
