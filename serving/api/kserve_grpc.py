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

A request whose bytes do not parse as its message would fail in Serve's proxy, before any of this code, as
UNKNOWN naming protobuf's DecodeError. `add_GRPCInferenceServiceServicer_to_server` here is the generated
registration with a request deserializer that passes such bytes on as `Undecodable`, which the method
answers INVALID_ARGUMENT: name it in grpc_options.grpc_servicer_functions.

The generated messages are imported on first use, not with this module: the ingress module is imported by
drivers that may also load Triton's or KServe's own generated `inference` package (tritonclient does), and
a protobuf descriptor pool refuses a second file defining the same names."""
import functools
import logging
import time
from dataclasses import dataclass

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from core.protos.parameters import parameter_value, set_parameter
from serving.api import auth
from serving.api.admission import START_HEADER, TIMEOUT_HEADER, note_client_timeout, note_request_start
from serving.api.errors import APIError, invalid
from serving.api.kserve import IMAGE, OUTPUTS, decode_input, parse_infer
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
        if (size := request.ByteSize()) > max_body_bytes():  # the HTTP body's limit (Serve's proxy allows 2 GiB)
            raise APIError(413, f"the request is larger than this server takes ({max_body_bytes()} bytes, "
                                f"got {size})", code="body_too_large")
        resolve_model(request.model_name, self.families)  # unknown: 404 before input checks
        raw = request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise invalid("raw_input_contents", f"raw_input_contents must hold one entry per input "
                                                f"({len(request.inputs)}), got {len(raw)}")
        inputs = [decode_input(t.name, t.datatype, list(t.shape), raw[i] if raw else list(t.contents.int64_contents))
                  for i, t in enumerate(request.inputs)]
        parameters = {k: parameter_value(v) for k, v in request.parameters.items()}
        req = parse_infer(request.model_name, request.model_version, request.id, inputs, parameters,
                          [o.name for o in request.outputs], self.families)
        result = await self.v2.infer(req)

        response = _pb().ModelInferResponse(model_name=result.name, model_version=result.version, id=result.id)
        for key, value in result.parameters.items():
            set_parameter(response.parameters[key], value)
        response.outputs.add(name=IMAGE, datatype=OUTPUTS[IMAGE].datatype, shape=result.images.shape)
        response.raw_output_contents.append(result.images.tobytes())  # raw, as Triton answers
        return response
