"""KServe v2 / Open Inference Protocol over gRPC: the inference.GRPCInferenceService methods of
core/protos/open_inference.proto, as methods of the ingress (Ingress inherits GRPCInferenceService).

Ray Serve's gRPC proxy (grpc_options in deploy/serve_config.yaml registers the generated
add_GRPCInferenceServiceServicer_to_server) calls the ingress method named after the RPC with the request
message and a `grpc_context`. An error is a status code and a message set on grpc_context with an empty
response returned: INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED (a model at capacity), UNAVAILABLE,
DEADLINE_EXCEEDED; INTERNAL only for a bug, and never with a traceback. With an API key configured
(serving/api/auth.py), every method but the health ones (ServerLive, ServerReady, ModelReady) needs the
`authorization: Bearer <key>` metadata, else UNAUTHENTICATED.

Deadlines: Serve's proxy does not pass the client's deadline on (its grpc_context carries no time
remaining), but when the deadline passes, gRPC cancels the call in the proxy, and Serve cancels the ingress
call and, through it, the model call: the request leaves the model's batch then. A deadline the model should
plan for goes in the parameters latency_slo_ms (or Triton's timeout, in microseconds).

ModelStreamInfer is Triton's decoupled streaming (bidirectional), which Serve's proxy carries to the method
as a gRPCInputStream of requests; the method is an async generator of ModelStreamInferResponse messages, a
request's error among them as error_message (Triton's convention), the stream going on.

A request whose bytes do not parse as its message would fail in Serve's proxy, before any of this code, as
UNKNOWN naming protobuf's DecodeError. `add_GRPCInferenceServiceServicer_to_server` here is the generated
registration with a request deserializer that passes such bytes on as `Undecodable`, which the method
answers INVALID_ARGUMENT: name it in grpc_options.grpc_servicer_functions.

The generated messages are imported on first use, not with this module: the ingress module is imported by
drivers that may also load Triton's or KServe's own generated `inference` package (tritonclient does), and
a protobuf descriptor pool refuses a second file defining the same names."""
import asyncio
import functools
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass, replace

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from core.checks import is_int
from core.protos.parameters import parameter_value, set_parameter
from serving.api import auth
from serving.api.admission import START_HEADER, TIMEOUT_HEADER, note_client_timeout, note_request_start
from serving.api.errors import APIError, invalid
from serving.api.jobs import GenerationPreview
from serving.api.kserve import IMAGE, OUTPUTS, InferRequest, InferResult, decode_input, parse_infer
from serving.api.validation import max_body_bytes, resolve_model

logger = logging.getLogger("ray.serve")


@functools.cache
def _pb():
    from core.protos import open_inference_pb2
    return open_inference_pb2


@dataclass(frozen=True)
class Undecodable:
    """What the proxy hands the ingress for request bytes that do not parse as the method's message."""

    size: int       # bytes received
    reason: str     # protobuf's word for it


def add_GRPCInferenceServiceServicer_to_server(servicer, server) -> None:
    """The generated registration (core.protos.open_inference_pb2_grpc's function of the same name), with
    every method's request deserializer made tolerant: bytes that do not parse reach the method as
    Undecodable instead of failing in the proxy. For Serve's grpc_options.grpc_servicer_functions."""
    from core.protos import open_inference_pb2_grpc
    open_inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, _TolerantRegistration(server))


class _TolerantRegistration:
    """Stands in for the server while the generated code registers its handlers, and passes them on with
    tolerant deserializers (Serve's server then swaps in its own routing and keeps them)."""

    def __init__(self, server):
        self._server = server

    def add_generic_rpc_handlers(self, generic_handlers) -> None:
        for handler in generic_handlers:
            handler._method_handlers = {k: _tolerant(h) for k, h in handler._method_handlers.items()}
        self._server.add_generic_rpc_handlers(generic_handlers)

    def add_registered_method_handlers(self, service: str, method_handlers: dict) -> None:
        if hasattr(self._server, "add_registered_method_handlers"):  # grpcio >= 1.67
            self._server.add_registered_method_handlers(service, {k: _tolerant(h) for k, h in method_handlers.items()})


def _tolerant(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    parse = handler.request_deserializer

    def deserialize(data: bytes):
        try:
            return parse(data)
        except DecodeError as exc:
            return Undecodable(len(data), str(exc))
    return handler._replace(request_deserializer=deserialize)


def status_code(err: APIError) -> grpc.StatusCode:
    """The gRPC status of an API error (serving.api.errors maps its HTTP status and code)."""
    return grpc.StatusCode[err.grpc_status()]


def _answers(response: str):
    """Decorate an RPC method: the API key checked first (but on the health methods), its APIError becomes a
    status on grpc_context (with an empty `response` message), and so does anything unexpected, as INTERNAL
    with the exception's type only."""
    def decorate(method):
        async def rpc(self, request, grpc_context):
            try:
                metadata = dict(grpc_context.invocation_metadata())
                # a client timeout in the metadata becomes the request's deadline, as HTTP's header does (the
                # gRPC deadline itself cancels the call through the proxy, but Serve does not pass its value on)
                note_client_timeout(metadata.get(TIMEOUT_HEADER.lower()), time.monotonic())
                note_request_start(metadata.get(START_HEADER.lower()), time.time())
                if method.__name__ not in auth.OPEN_RPCS:
                    auth.check_authorization(metadata.get("authorization"))
                if isinstance(request, Undecodable):
                    raise invalid(None, f"the {request.size} bytes received are not a {method.__name__}Request "
                                        f"message ({request.reason})")
                return await method(self, request)
            except APIError as err:
                grpc_context.set_code(status_code(err))
                grpc_context.set_details(err.message)
            except Exception as exc:
                logger.exception("genserve ingress: %s failed", method.__name__)
                grpc_context.set_code(grpc.StatusCode.INTERNAL)
                grpc_context.set_details(f"internal error: {type(exc).__name__}")
            return getattr(_pb(), response)()
        # not functools.wraps: Serve looks for `grpc_context` in the signature, which wraps would hide
        rpc.__name__, rpc.__qualname__, rpc.__doc__ = method.__name__, method.__qualname__, method.__doc__
        return rpc
    return decorate


class GRPCInferenceService:
    """The RPCs, over the ingress's `v2` (serving.api.kserve.OpenInference)."""

    @_answers("ServerLiveResponse")
    async def ServerLive(self, request):
        return _pb().ServerLiveResponse(live=True)

    @_answers("ServerReadyResponse")
    async def ServerReady(self, request):
        return _pb().ServerReadyResponse(ready=await self.v2.server_ready())

    @_answers("ModelReadyResponse")
    async def ModelReady(self, request):
        return _pb().ModelReadyResponse(ready=await self.v2.model_ready(request.name, request.version))

    @_answers("ServerMetadataResponse")
    async def ServerMetadata(self, request):
        return json_format.ParseDict(self.v2.server_metadata(), _pb().ServerMetadataResponse())

    @_answers("ModelMetadataResponse")
    async def ModelMetadata(self, request):
        metadata = await self.v2.model_metadata(request.name, request.version)
        return json_format.ParseDict(metadata, _pb().ModelMetadataResponse())

    @_answers("ModelConfigResponse")
    async def ModelConfig(self, request):
        config = await self.v2.model_config(request.name, request.version)
        return _pb().ModelConfigResponse(config=json_format.ParseDict(config, _pb().ModelConfig()))

    @_answers("ModelStatisticsResponse")
    async def ModelStatistics(self, request):
        stats = await self.v2.model_statistics(request.name, request.version)
        # the proto declares only the statistics genserve measures
        return json_format.ParseDict(stats, _pb().ModelStatisticsResponse(), ignore_unknown_fields=True)

    @_answers("ModelInferResponse")
    async def ModelInfer(self, request):
        return _infer_response(await self.v2.infer(_infer_request(request, self.families)))

    async def ModelStreamInfer(self, request_stream, grpc_context):
        """Triton's decoupled streaming. Each request on the stream runs as its own task, so requests overlap
        and their responses interleave: with parameter partial_images k (0..3), k responses with the partial
        images (parameters partial_image_index, step, steps; one-pass models make none), then the final
        response, ModelInfer's; every response says whether it is its request's last in triton_final_response.
        A request's error is an error_message on the stream, which goes on. The API key is the stream's (its
        metadata): without it the stream ends UNAUTHENTICATED. A request's deadline is its own (latency_slo_ms,
        timeout); Serve's proxy ends the whole stream at grpc_options.request_timeout_s. A client that cancels
        the stream cancels its requests, which leave the model's step batch at its next step."""
        try:
            auth.check_authorization(dict(grpc_context.invocation_metadata()).get("authorization"))
        except APIError as err:
            # a generator's status reaches the client only through an exception (Serve's proxy applies
            # grpc_context with each message, and there is none), which Serve sends with the code and details
            # set here; a builtin one, as the proxy must unpickle it
            grpc_context.set_code(status_code(err))
            grpc_context.set_details(err.message)
            raise PermissionError(err.message) from None
        responses: asyncio.Queue = asyncio.Queue()
        reader = asyncio.create_task(self._run_stream(request_stream, responses))
        try:
            while (response := await responses.get()) is not None:
                yield response
            await reader   # its failure, if any, is the stream's
        finally:
            reader.cancel()   # the client left (or the stream failed): so do its requests

    async def _run_stream(self, request_stream, responses: asyncio.Queue) -> None:
        """Start a task per request as it arrives; once the client has sent its last, wait for them, then end
        the responses (None). A cancelled stream ends the input early and cancels its requests' tasks."""
        tasks: set[asyncio.Task] = set()
        try:
            async for request in request_stream:
                task = asyncio.create_task(self._stream_one(request, responses.put_nowait))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if not request_stream.is_cancelled():
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            responses.put_nowait(None)

    async def _stream_one(self, request, send) -> None:
        """One request of a stream: its responses, or its error, sent as ModelStreamInferResponse messages."""
        pb = _pb()
        try:
            if isinstance(request, Undecodable):
                raise invalid(None, f"the {request.size} bytes received are not a ModelInferRequest message "
                                    f"({request.reason})")
            previews = _partial_images(request)
            req = _infer_request(request, self.families, dropped=STREAM_PARAMETERS)
            req = replace(req, jobs=tuple(replace(j, previews=previews) for j in req.jobs))
            async with aclosing(self.v2.infer_stream(req)) as events:
                async for event in events:
                    final = isinstance(event, InferResult)
                    response = _infer_response(event) if final else _preview_response(req, event)
                    set_parameter(response.parameters[FINAL], final)
                    send(pb.ModelStreamInferResponse(infer_response=response))
        except APIError as err:
            send(_stream_error(request, err.message))
        except Exception as exc:
            logger.exception("genserve ingress: ModelStreamInfer failed")
            send(_stream_error(request, f"internal error: {type(exc).__name__}"))


# ---- ModelInfer's and ModelStreamInfer's messages ---------------------------------------------------------

PARTIAL_IMAGES = "partial_images"   # ModelStreamInfer's: partial images before the final one
MAX_PARTIAL_IMAGES = 3
FINAL = "triton_final_response"      # on every streamed response: the request's last or not
# Parameters ModelStreamInfer takes beyond ModelInfer's. tritonclient's enable_empty_final_response sends the
# second: it asks for the final flag in a response of its own where the last response could not carry it,
# and here the last response always does
STREAM_PARAMETERS = (PARTIAL_IMAGES, "triton_enable_empty_final_response")


def _infer_request(request, families: dict[str, str], dropped: tuple[str, ...] = ()) -> InferRequest:
    """A ModelInferRequest, checked (serving.api.kserve.parse_infer) but for the `dropped` parameters, which
    the caller reads itself. Raises APIError."""
    if (size := request.ByteSize()) > max_body_bytes():  # the HTTP body's limit (Serve's proxy allows 2 GiB)
        raise APIError(413, f"the request is larger than this server takes ({max_body_bytes()} bytes, "
                            f"got {size})", code="body_too_large")
    resolve_model(request.model_name, families)  # unknown: 404 before input checks
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise invalid("raw_input_contents", f"raw_input_contents must hold one entry per input "
                                            f"({len(request.inputs)}), got {len(raw)}")
    inputs = [decode_input(t.name, t.datatype, list(t.shape), raw[i] if raw else list(t.contents.int64_contents))
              for i, t in enumerate(request.inputs)]
    parameters = {k: parameter_value(v) for k, v in request.parameters.items() if k not in dropped}
    return parse_infer(request.model_name, request.model_version, request.id, inputs, parameters,
                       [o.name for o in request.outputs], families)


def _partial_images(request) -> int:
    value = parameter_value(request.parameters[PARTIAL_IMAGES]) if PARTIAL_IMAGES in request.parameters else 0
    if not is_int(value) or not 0 <= value <= MAX_PARTIAL_IMAGES:
        raise invalid(PARTIAL_IMAGES, f"{PARTIAL_IMAGES} must be an integer in [0, {MAX_PARTIAL_IMAGES}], "
                                      f"got {value!r}")
    return value


def _infer_response(result: InferResult):
    """ModelInfer's answer: the image output as raw bytes (as Triton answers), and the result's parameters."""
    response = _pb().ModelInferResponse(model_name=result.name, model_version=result.version, id=result.id)
    for key, value in result.parameters.items():
        set_parameter(response.parameters[key], value)
    _add_image(response, result.images)
    return response


def _preview_response(req: InferRequest, preview: GenerationPreview):
    """A partial image's response: the image output, and which partial image of how many steps it is."""
    response = _pb().ModelInferResponse(model_name=preview.model, model_version=preview.version, id=req.id)
    for key, value in (("partial_image_index", preview.index), ("step", preview.step), ("steps", preview.steps)):
        set_parameter(response.parameters[key], value)
    _add_image(response, preview.images)
    return response


def _add_image(response, images) -> None:
    response.outputs.add(name=IMAGE, datatype=OUTPUTS[IMAGE].datatype, shape=images.shape)
    response.raw_output_contents.append(images.tobytes())


def _stream_error(request, message: str):
    """Triton's form of one request's error on a stream: error_message, with the request's id and model in
    infer_response so that a client of several requests at once can tell which failed."""
    pb = _pb()
    if isinstance(request, Undecodable):
        return pb.ModelStreamInferResponse(error_message=message)
    return pb.ModelStreamInferResponse(error_message=message, infer_response=pb.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version, id=request.id))
