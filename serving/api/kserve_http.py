"""KServe v2 / Open Inference Protocol over HTTP, with Triton's binary tensor extension, /config and /stats.
Included in the ingress's app by ingress.py; the operations are serving.api.kserve.OpenInference (the
ingress's `v2`). Errors under /v2 are {"error": message} (serving/api/http.py renders them).

    GET  /v2                                          server metadata
    GET  /v2/health/live | /v2/health/ready
    GET  /v2/models/{m}[/versions/{v}]                model metadata
    GET  /v2/models/{m}[/versions/{v}]/ready | /config | /stats;  GET /v2/models/stats (every model)
    POST /v2/models/{m}[/versions/{v}]/infer

Binary tensors: with the header Inference-Header-Content-Length: N, the body is N bytes of JSON and then
each input that has parameters.binary_data_size, in input order. An output asked for with
parameters.binary_data (or the request parameter binary_data_output) comes back the same way, uncoded:
the images' bytes straight from numpy, which spares a JSON list of 784 numbers per image."""
import json

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from core.checks import is_int
from serving.api.errors import invalid
from serving.api.http import current_ingress, decode_json
from serving.api.kserve import IMAGE, OUTPUTS, InferResult, decode_input, parse_infer
from serving.api.validation import resolve_model

router = APIRouter(prefix="/v2")
HEADER_LENGTH = "Inference-Header-Content-Length"
_REQUEST_FIELDS = {"id", "parameters", "inputs", "outputs"}


@router.get("")
async def server_metadata(ingress=Depends(current_ingress)) -> JSONResponse:
    return JSONResponse(ingress.v2.server_metadata())


@router.get("/health/live")
async def live() -> JSONResponse:
    return JSONResponse({"live": True})  # answering at all is being live


@router.get("/health/ready")
async def ready(ingress=Depends(current_ingress)) -> JSONResponse:
    """200 {"ready": true}, or 503 naming each model that is not ready and why ("not_ready": {model: reason}):
    one model failing to load leaves the others serving, and this says which."""
    not_ready = await ingress.v2.not_ready()
    if not_ready:
        return JSONResponse({"ready": False, "not_ready": not_ready}, status_code=503)
    return JSONResponse({"ready": True})


@router.get("/models/stats")
async def all_statistics(ingress=Depends(current_ingress)) -> JSONResponse:
    return JSONResponse(await ingress.v2.model_statistics("", ""))


@router.get("/models/{model}")
@router.get("/models/{model}/versions/{version}")
async def model_metadata(model: str, version: str = "", ingress=Depends(current_ingress)) -> JSONResponse:
    return JSONResponse(await ingress.v2.model_metadata(model, version))


@router.get("/models/{model}/ready")
@router.get("/models/{model}/versions/{version}/ready")
async def model_ready(model: str, version: str = "", ingress=Depends(current_ingress)) -> JSONResponse:
    is_ready = await ingress.v2.model_ready(model, version)
    return JSONResponse({"name": model, "ready": is_ready}, status_code=200 if is_ready else 503)


@router.get("/models/{model}/config")
@router.get("/models/{model}/versions/{version}/config")
async def model_config(model: str, version: str = "", ingress=Depends(current_ingress)) -> JSONResponse:
    return JSONResponse(await ingress.v2.model_config(model, version))


@router.get("/models/{model}/stats")
@router.get("/models/{model}/versions/{version}/stats")
async def model_statistics(model: str, version: str = "", ingress=Depends(current_ingress)) -> JSONResponse:
    return JSONResponse(await ingress.v2.model_statistics(model, version))


@router.post("/models/{model}/infer")
@router.post("/models/{model}/versions/{version}/infer")
async def infer(model: str, request: Request, version: str = "", ingress=Depends(current_ingress)) -> Response:
    resolve_model(model, ingress.families)  # an unknown model: 404 before body checks
    body, binary = _split_body(await request.body(), request.headers.get(HEADER_LENGTH))
    if not isinstance(body, dict):
        raise invalid(None, f"the request body must be a JSON object, got {type(body).__name__}")
    if unknown := sorted(set(body) - _REQUEST_FIELDS):
        raise invalid(None, f"unknown field {unknown[0]!r}; a request has {', '.join(sorted(_REQUEST_FIELDS))}")
    parameters = _object(body.get("parameters"), "parameters")
    binary_default = _flag(parameters.pop("binary_data_output", False), "binary_data_output")
    inputs = _inputs(_list(body.get("inputs"), "inputs"), binary)
    outputs = [_object(o, "each output") for o in _list(body.get("outputs", []), "outputs")]
    binary_out = {_name(o, "each output"): _flag(_parameters(o, {"binary_data"}).get("binary_data", binary_default),
                                                 "binary_data") for o in outputs}
    request_id = body.get("id", "")
    if not isinstance(request_id, str):
        raise invalid(None, f"id must be a string, got {request_id!r}")
    req = parse_infer(model, version, request_id, inputs, parameters, list(binary_out), ingress.families)
    # no outputs named: every output (there is one), in the request's default encoding
    return _response(await ingress.v2.infer(req), binary_out or dict.fromkeys(OUTPUTS, binary_default))


def _split_body(raw: bytes, header_length: str | None) -> tuple[object, bytes]:
    """The JSON part (decoded) and the binary tensors after it."""
    if header_length is None:
        return decode_json(raw), b""
    if not (header_length.isascii() and header_length.isdigit() and len(header_length) <= 12) \
            or int(header_length) > len(raw):
        raise invalid(None, f"{HEADER_LENGTH} must be the length of the JSON part of the body (at most {len(raw)}), "
                            f"got {header_length!r}")
    n = int(header_length)
    return decode_json(raw[:n]), raw[n:]


def _inputs(items: list, binary: bytes) -> list[tuple[str, list[int]]]:
    """Decode each input; binary ones take their binary_data_size bytes from `binary`, in order."""
    decoded, offset = [], 0
    for item in items:
        item = _object(item, "each input")
        size = _parameters(item, {"binary_data_size"}).get("binary_data_size")
        if size is None:
            if "data" not in item:
                raise invalid(None, f"input {item.get('name')!r} has neither data nor parameters.binary_data_size")
            data = item["data"]
        elif not is_int(size) or not 0 <= size <= len(binary) - offset:
            raise invalid(None, f"input {item.get('name')!r}: binary_data_size {size!r} does not fit the "
                                f"{len(binary) - offset} bytes of binary data left")
        else:
            data, offset = binary[offset:offset + size], offset + size
        decoded.append(decode_input(item.get("name"), item.get("datatype"), item.get("shape"), data))
    if offset != len(binary):
        raise invalid(None, f"{len(binary) - offset} bytes of binary data after the inputs' binary_data_size")
    return decoded


def _response(result: InferResult, binary_out: dict[str, bool]) -> Response:
    images = result.images
    tensor = {"name": IMAGE, "datatype": OUTPUTS[IMAGE].datatype, "shape": list(images.shape)}
    body = {"model_name": result.name, "model_version": result.version, "id": result.id,
            "parameters": result.parameters, "outputs": [tensor]}
    if not binary_out[IMAGE]:
        tensor["data"] = images.ravel().tolist()
        return JSONResponse(body)
    tensor["parameters"] = {"binary_data_size": images.nbytes}
    header = json.dumps(body).encode()
    return Response(header + images.tobytes(), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


def _parameters(tensor: dict, known: set[str]) -> dict:
    """A tensor's parameters, of which genserve knows `known` (not, e.g., Triton's shared memory)."""
    parameters = _object(tensor.get("parameters"), f"parameters of {tensor.get('name')!r}")
    if unknown := sorted(set(parameters) - known):
        raise invalid(None, f"{tensor.get('name')!r}: unsupported parameter {unknown[0]!r}; tensors take "
                            f"{', '.join(sorted(known))}")
    return parameters


def _name(tensor: dict, what: str) -> str:
    name = tensor.get("name")
    if not isinstance(name, str):
        raise invalid(None, f"{what} needs a name (a string), got {name!r}")
    return name


def _flag(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise invalid(None, f"{what} must be true or false, got {value!r}")
    return value


def _object(value: object, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(None, f"{what} must be a JSON object, got {value!r}")
    return dict(value)


def _list(value: object, what: str) -> list:
    if not isinstance(value, list):
        raise invalid(None, f"{what} must be a JSON list, got {value!r}")
    return value
