"""Protocol clients with one interface: send(template, seed) -> Outcome. Timing is the runner's (it measures
from the intended send time); a client only speaks its protocol and reads what the answer says served it.

    openai       POST {url}/v1/images/generations; GET {url}/v1/models
    kserve_http  POST {url}/v2/models/{model}/infer (KServe v2 JSON: inputs class_id, seed INT64 [n];
                 the extras as parameters; output image UINT8 [n, 28, 28]); GET {url}/v2
    kserve_grpc  the same over inference.GRPCInferenceService (core/protos/open_inference.proto):
                 ModelInfer, ServerMetadata; grpc://HOST:PORT
"""
from __future__ import annotations

import functools
import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc

from core.protos.parameters import parameter_value, set_parameter
from loadtests.scenario import Scenario, Template

IMAGE_SIDE = 28


@dataclass(frozen=True)
class Outcome:
    """What one request got back."""

    status: int                 # HTTP status (gRPC's mapped to it); 0 when no answer came (the error says why)
    bytes: int = 0              # response size
    model: str | None = None    # what the server says served it (the policy's choice for "auto")
    family: str | None = None
    settings: dict | None = None
    policy: dict | None = None
    server_ms: float | None = None
    error: str | None = None    # None on success; a 200 with a malformed answer has one too

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


def openai_body(template: Template, seed: int) -> dict[str, Any]:
    """The POST /v1/images/generations body for one request: only the fields the template sets."""
    body: dict[str, Any] = {"model": template.model, "n": template.n, "seed": seed}
    if template.prompt is not None:
        body["prompt"] = template.prompt
    if template.class_id is not None:
        body["class_id"] = template.class_id
    return body | template.extras()


def kserve_body(template: Template, seed: int) -> dict[str, Any]:
    """The KServe v2 inference request for one request: image i gets seed + i."""
    n = template.n
    return {"inputs": [{"name": "class_id", "shape": [n], "datatype": "INT64", "data": [template.class_id] * n},
                       {"name": "seed", "shape": [n], "datatype": "INT64", "data": [seed + i for i in range(n)]}],
            "parameters": template.extras(),
            "outputs": [{"name": "image"}]}


def _error_message(status: int, text: str, headers: Any) -> str:
    """The server's own message when the body has one (OpenAI's {"error": {"message"}}, KServe's {"error"})."""
    try:
        error = json.loads(text).get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    message = f"HTTP {status}: {message or text[:200]}"
    if retry := headers.get("Retry-After"):
        message += f" (Retry-After: {retry})"
    return message


class Client(ABC):
    """One per run, used as `async with`; send() runs as many times at once as the load asks."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    @abstractmethod
    async def server_info(self) -> Any:
        """Runs once before the first send: what the server serves, for run.json. Raises RuntimeError when
        the server cannot be reached or refuses, so a run against nothing fails at once."""

    @abstractmethod
    async def send(self, template: Template, seed: int) -> Outcome:
        """One request; never raises for what the server or the network does (that is in the Outcome)."""


class HTTPClient(Client):
    """A JSON-over-HTTP protocol: where its model list is, how a template becomes a request, how an answer
    is read."""

    info_path: str              # GET: what the server serves

    async def __aenter__(self) -> Client:
        # No connection limit (aiohttp's default is 100): the open loop must never queue inside the client.
        # No client timeout: the runner bounds each request by the scenario's request_timeout_s.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                              timeout=aiohttp.ClientTimeout(total=None))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()

    @abstractmethod
    def request(self, template: Template, seed: int) -> tuple[str, dict[str, Any]]:
        """(path, JSON body) of one request."""

    @abstractmethod
    def read(self, template: Template, body: Any, size: int) -> Outcome:
        """A 200's decoded body (of `size` bytes) -> the Outcome, with an error if the answer is not what was
        asked. May raise KeyError / TypeError / StopIteration on a malformed body."""

    async def server_info(self) -> Any:
        url = self.url + self.info_path
        try:
            async with self._session.get(url) as r:
                text = await r.text()
                if r.status != 200:
                    raise RuntimeError(f"GET {url}: {_error_message(r.status, text, r.headers)}")
                return json.loads(text)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise RuntimeError(f"cannot reach the server: GET {url}: {exc}") from None

    async def send(self, template: Template, seed: int) -> Outcome:
        path, body = self.request(template, seed)
        try:
            # when it left: the server spends the time before its ingress saw it from the request's SLO
            headers = {"X-Request-Start": f"t={time.time():.6f}"}
            async with self._session.post(self.url + path, json=body, headers=headers) as r:
                status, raw, headers = r.status, await r.read(), r.headers
        except (aiohttp.ClientError, OSError) as exc:
            return Outcome(0, error=f"{type(exc).__name__}: {exc}")
        if status != 200:
            return Outcome(status, len(raw), error=_error_message(status, raw.decode(errors="replace"), headers))
        try:
            return self.read(template, json.loads(raw), len(raw))
        except (ValueError, KeyError, TypeError, StopIteration) as exc:
            return Outcome(status, len(raw), error=f"malformed answer: {exc!r}")


class OpenAIClient(HTTPClient):
    info_path = "/v1/models"

    def request(self, template: Template, seed: int) -> tuple[str, dict[str, Any]]:
        return "/v1/images/generations", openai_body(template, seed)

    def read(self, template: Template, body: Any, size: int) -> Outcome:
        images = len(body["data"])
        return Outcome(200, size, body.get("model"), body.get("family"), body.get("settings"), body.get("policy"),
                       body.get("latency_ms"),
                       None if images == template.n else f"asked for {template.n} images, got {images}")


def _image_error(template: Template, datatype: Any, shape: list, size: int) -> str | None:
    """What is wrong with an image output of `size` bytes, if anything."""
    want = [template.n, IMAGE_SIDE, IMAGE_SIDE]
    if datatype != "UINT8" or shape != want or size != template.n * IMAGE_SIDE**2:
        return f"image output: want UINT8 {want} ({template.n * IMAGE_SIDE**2} values), got {datatype} {shape} ({size})"
    return None


def _served(model: str, parameters: dict[str, Any], size: int, error: str | None) -> Outcome:
    """A KServe answer's Outcome: its parameters are the family and the settings used (plus the seed the
    server drew, and later the policy's decision and the server's latency)."""
    settings = {k: v for k, v in parameters.items() if k not in ("family", "seed", "policy", "latency_ms")}
    return Outcome(200, size, model, parameters.get("family"), settings, parameters.get("policy"),
                   parameters.get("latency_ms"), error)


class KServeHTTPClient(HTTPClient):
    info_path = "/v2"

    def request(self, template: Template, seed: int) -> tuple[str, dict[str, Any]]:
        return f"/v2/models/{template.model}/infer", kserve_body(template, seed)

    def read(self, template: Template, body: Any, size: int) -> Outcome:
        image = next(o for o in body["outputs"] if o["name"] == "image")
        error = _image_error(template, image.get("datatype"), image["shape"], len(image["data"]))
        return _served(body["model_name"], body.get("parameters") or {}, size, error)


# gRPC status -> the HTTP status of the same meaning, so the stats read every protocol alike
HTTP_STATUS = {grpc.StatusCode.OK: 200, grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
               grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
               grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.UNAVAILABLE: 503,
               grpc.StatusCode.DEADLINE_EXCEEDED: 504}


@functools.cache
def _pb():
    """genserve's generated messages, imported on first use: a process that has loaded another package
    defining the `inference` protobuf names (tritonclient.grpc does) cannot load these too."""
    from core.protos import open_inference_pb2, open_inference_pb2_grpc
    return open_inference_pb2, open_inference_pb2_grpc


class KServeGRPCClient(Client):
    """KServe v2 over gRPC; url grpc://HOST:PORT. One channel multiplexes every request (HTTP/2 streams)."""

    async def __aenter__(self) -> Client:
        pb, pb_grpc = _pb()
        self._channel = grpc.aio.insecure_channel(self.url.removeprefix("grpc://"))
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._channel.close()

    async def server_info(self) -> Any:
        from google.protobuf.json_format import MessageToDict

        pb, _ = _pb()
        try:
            return MessageToDict(await self._stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10))
        except grpc.aio.AioRpcError as err:
            raise RuntimeError(f"cannot reach the server: ServerMetadata at {self.url}: {err.code().name}: "
                               f"{err.details()}") from None

    async def send(self, template: Template, seed: int) -> Outcome:
        pb, _ = _pb()
        n = template.n
        request = pb.ModelInferRequest(model_name=template.model)
        request.inputs.add(name="class_id", datatype="INT64", shape=[n]).contents.int64_contents.extend(
            [template.class_id] * n)
        request.inputs.add(name="seed", datatype="INT64", shape=[n]).contents.int64_contents.extend(
            [seed + i for i in range(n)])
        for key, value in template.extras().items():
            set_parameter(request.parameters[key], value)
        request.outputs.add(name="image")
        try:
            response = await self._stub.ModelInfer(request, metadata=(("x-request-start", f"t={time.time():.6f}"),))
        except grpc.aio.AioRpcError as err:
            return Outcome(HTTP_STATUS.get(err.code(), 500), error=f"gRPC {err.code().name}: {err.details()}")
        size = response.ByteSize()
        try:
            image = next(i for i, o in enumerate(response.outputs) if o.name == "image")
        except StopIteration:
            return Outcome(200, size, error="malformed answer: no image output")
        out = response.outputs[image]
        # raw bytes, as Triton and genserve answer; else typed contents
        values = (len(response.raw_output_contents[image]) if len(response.raw_output_contents) > image
                  else len(out.contents.uint_contents))
        parameters = {k: value for k, v in response.parameters.items() if (value := parameter_value(v)) is not None}
        return _served(response.model_name, parameters, size,
                       _image_error(template, out.datatype, list(out.shape), values))


def make_client(scenario: Scenario) -> Client:
    """The client for the scenario's protocol."""
    return {"openai": OpenAIClient, "kserve_http": KServeHTTPClient,
            "kserve_grpc": KServeGRPCClient}[scenario.protocol](scenario.url)
