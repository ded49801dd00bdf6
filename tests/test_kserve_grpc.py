"""KServe v2 / Open Inference Protocol over gRPC, through Ray Serve's gRPC proxy, end to end with Triton's real
client (tritonclient.grpc), whose generated `inference` messages are Triton's own: that they parse genserve's
answers is the wire compatibility of core/protos/open_inference.proto. Health, metadata, config,
statistics, inference on every served model with raw and with typed tensor contents, parameters, and status
codes (NOT_FOUND, INVALID_ARGUMENT, DEADLINE_EXCEEDED, UNIMPLEMENTED), with the client's deadline cancelling
the work on the server. The app is the session's (tests/conftest.py)."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from core.contracts import NULL_CLASS
from serving.api.errors import APIError
from serving.api.kserve_grpc import status_code
from tests.helpers import SERVED_FAMILIES, replica_metrics

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's, not ours
FAST = {"diffusion": {"steps": 2},   # per model: parameters that keep the test fast, and pin
        "auto": {"goal": "latent"}}   # auto to the one model that does latent work, the VAE


def test_status_codes():
    codes = {(400, None): "INVALID_ARGUMENT", (404, "model_not_found"): "NOT_FOUND",
             (429, "slo_unattainable"): "RESOURCE_EXHAUSTED",
             (503, "overloaded"): "RESOURCE_EXHAUSTED", (503, "engine_stopped"): "UNAVAILABLE",
             (504, "deadline_exceeded"): "DEADLINE_EXCEEDED", (500, "model_error"): "INTERNAL"}
    for (status, code), name in codes.items():
        assert status_code(APIError(status, "m", code=code)) == getattr(grpc.StatusCode, name)


# ---- the running app ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(server) -> grpcclient.InferenceServerClient:
    c = grpcclient.InferenceServerClient(server["grpc"])
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(server) -> service_pb2_grpc.GRPCInferenceServiceStub:
    """The bare generated stub (Triton's), for what tritonclient does not send: typed tensor contents."""
    with grpc.insecure_channel(server["grpc"]) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def infer(client, model, class_ids, seeds=None, **kwargs):
    """(images, response) with raw tensor contents, as tritonclient sends them."""
    tensors = []
    for name, values in [("class_id", class_ids)] + ([("seed", seeds)] if seeds is not None else []):
        t = grpcclient.InferInput(name, [len(values)], "INT64")
        t.set_data_from_numpy(np.asarray(values, np.int64))
        tensors.append(t)
    result = client.infer(model, tensors, **kwargs)
    return result.as_numpy("image"), result.get_response()


def infer_typed(stub, model, class_ids, seeds, parameters=None) -> np.ndarray:
    """The same with typed contents (int64_contents), KServe's other encoding."""
    request = service_pb2.ModelInferRequest(model_name=model)
    for name, values in (("class_id", class_ids), ("seed", seeds)):
        t = request.inputs.add(name=name, datatype="INT64", shape=[len(values)])
        t.contents.int64_contents.extend(values)
    for key, value in (parameters or {}).items():
        if isinstance(value, str):
            request.parameters[key].string_param = value
        elif isinstance(value, bool):
            request.parameters[key].bool_param = value
        else:
            request.parameters[key].int64_param = value
    response = stub.ModelInfer(request, timeout=120)
    assert [o.name for o in response.outputs] == ["image"] and response.outputs[0].datatype == "UINT8"
    return np.frombuffer(response.raw_output_contents[0], np.uint8).reshape(response.outputs[0].shape)


def infer_http(server, model, class_ids, seeds, binary, **parameters) -> np.ndarray:
    """Over HTTP with Triton's client (one per call: it is not shared across threads)."""
    import tritonclient.http as httpclient

    http = httpclient.InferenceServerClient(server["url"].removeprefix("http://"), network_timeout=120)
    tensors = []
    for name, values in (("class_id", class_ids), ("seed", seeds)):
        t = httpclient.InferInput(name, [len(values)], "INT64")
        t.set_data_from_numpy(np.asarray(values, np.int64), binary_data=binary)
        tensors.append(t)
    try:
        return http.infer(model, tensors, outputs=[httpclient.InferRequestedOutput("image", binary_data=binary)],
                          parameters=parameters or None).as_numpy("image")
    finally:
        http.close()


def status_of(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call()
    assert "Traceback" not in (info.value.message() or "")
    return info.value.status(), info.value.message()



def test_health_and_server_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "genserve" and meta.version
    assert list(meta.extensions) == ["binary_tensor_data", "parameters", "model_configuration", "statistics"]


@pytest.mark.parametrize("model", [*SERVED_FAMILIES, "auto"])
def test_model_metadata_config_and_readiness(client, served_store, model):
    version = "" if model == "auto" else served_store.resolve(model)[1]
    assert client.is_model_ready(model) and client.is_model_ready(model, version)
    meta = client.get_model_metadata(model, as_json=True)
    assert (meta["name"], meta["platform"]) == (model, "genserve")
    assert meta.get("versions", []) == ([version] if version else [])   # proto JSON leaves empty lists out
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == \
           [("class_id", "INT64", ["-1"]), ("seed", "INT64", ["-1"])]       # int64 is a string in proto JSON
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [("image", "UINT8", ["-1", "28", "28"])]
    config = client.get_model_config(model).config                        # Triton's own ModelConfig message
    assert (config.name, config.backend, config.max_batch_size) == (model, "onnxruntime", 0)
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in config.input] == \
           [("class_id", model_config_pb2.TYPE_INT64, [-1], False),
            ("seed", model_config_pb2.TYPE_INT64, [-1], True)]
    assert [(o.name, list(o.dims)) for o in config.output] == [("image", [-1, 28, 28])]
    if model != "auto":
        assert status_of(lambda: client.is_model_ready(model, "000000000000"))[0] == "StatusCode.NOT_FOUND"


@pytest.mark.parametrize("model", [m for m in SERVED_FAMILIES if m != "pixelcnn"] + ["auto"])
def test_infer_raw_and_typed_contents_give_the_same_images(client, stub, served_store, model):
    params = FAST.get(model, {})
    images, response = infer(client, model, [7, 7, NULL_CLASS], [11, 12, 11], parameters=params or None)
    assert images.shape == (3, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(infer_typed(stub, model, [7, 7, NULL_CLASS], [11, 12, 11], params), images)
    served = "vae" if model == "auto" else model       # goal latent: the VAE
    assert (response.model_name, response.model_version) == (served, served_store.resolve(served)[1])
    assert response.parameters["family"].string_param == served
    assert not np.array_equal(images[0], images[1])


def test_pixelcnn_in_every_encoding(client, stub, server):
    """PixelCNN takes 784 engine steps an image, so its four requests (gRPC raw and typed, HTTP JSON and
    binary) run at once, each on its own thread, and share the steps."""
    before = replica_metrics("pixelcnn")["steps"]
    anyway = {"best_effort": True}  # four at once may be past the default SLO, which is not what this tests
    with ThreadPoolExecutor(4) as pool:
        over_http = [pool.submit(infer_http, server, "pixelcnn", [1], [3], binary, **anyway) for binary in (False, True)]
        typed = pool.submit(infer_typed, stub, "pixelcnn", [1], [3], anyway)
        images, _ = infer(client, "pixelcnn", [1], [3], parameters=anyway)
        assert images.shape == (1, 28, 28)
        for other in (typed, *over_http):
            np.testing.assert_array_equal(other.result(), images)
    assert replica_metrics("pixelcnn")["steps"] - before < 2 * 784   # they shared forwards


def test_the_same_images_over_http_and_grpc(client, server):
    np.testing.assert_array_equal(infer(client, "diffusion", [3, 4], [5, 6], parameters={"steps": 2})[0],
                                  infer_http(server, "diffusion", [3, 4], [5, 6], binary=True, steps=2))


def test_reflection_lets_grpcurl_call_without_the_proto(server):
    """grpcurl's way (README): the service's descriptors from server reflection, the request from JSON."""
    from google.protobuf import descriptor_pool, json_format, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server["grpc"]) as channel:
        reflection = ProtoReflectionDescriptorDatabase(channel)
        assert "inference.GRPCInferenceService" in reflection.get_services()
        service = descriptor_pool.DescriptorPool(reflection).FindServiceByName("inference.GRPCInferenceService")
        method = service.methods_by_name["ModelInfer"]
        request_type, response_type = (message_factory.GetMessageClass(t) for t in (method.input_type,
                                                                                   method.output_type))
        request = json_format.Parse('{"model_name": "gan", "inputs": [{"name": "class_id", "datatype": "INT64", '
                                    '"shape": [2], "contents": {"int64_contents": [7, 9]}}]}', request_type())
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=request_type.SerializeToString,
                                   response_deserializer=response_type.FromString)
        response = call(request, timeout=60)
    assert list(response.outputs[0].shape) == [2, 28, 28] and len(response.raw_output_contents[0]) == 2 * 784


def test_parameters_and_statistics(client, served_store):
    before = client.get_inference_statistics("diffusion").model_stats[0]
    _, response = infer(client, "diffusion", [1], [5], parameters={"sampler": "ddim", "steps": 3,
                                                                  "guidance_scale": 1.5})
    p = response.parameters
    assert (p["sampler"].string_param, p["steps"].int64_param, p["guidance_scale"].double_param) == ("ddim", 3, 1.5)
    after = client.get_inference_statistics("diffusion").model_stats[0]
    assert (after.name, after.version) == ("diffusion", served_store.resolve("diffusion")[1])
    assert (after.inference_count - before.inference_count, after.execution_count - before.execution_count) == (1, 1)
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns


def test_status_codes_and_the_server_keeps_serving(client, stub):
    assert status_of(lambda: infer(client, "nope", [1]))[0] == "StatusCode.NOT_FOUND"
    assert status_of(lambda: client.get_model_metadata("nope"))[0] == "StatusCode.NOT_FOUND"
    bad = grpcclient.InferInput("class_id", [1], "FP32")
    bad.set_data_from_numpy(np.array([1.0], np.float32))
    assert status_of(lambda: client.infer("gan", [bad])) == ("StatusCode.INVALID_ARGUMENT",
                                                            "input 'class_id' must be INT64, got 'FP32'")
    status, message = status_of(lambda: infer(client, "gan", [11]))
    assert status == "StatusCode.INVALID_ARGUMENT" and message.startswith("class_id must be an integer in [0, 10]")
    assert status_of(lambda: infer(client, "gan", [1], parameters={"steps": 2}))[0] == "StatusCode.INVALID_ARGUMENT"
    slow = {"steps": 1000, "latency_slo_ms": 50}   # admission: nothing can do it, so refused at once
    status, message = status_of(lambda: infer(client, "diffusion", [1, 2], parameters=slow))
    assert status == "StatusCode.RESOURCE_EXHAUSTED" and "no candidate can finish within the SLO" in message
    status, message = status_of(lambda: infer(client, "diffusion", [1, 2], parameters=slow | {"best_effort": True}))
    assert status == "StatusCode.DEADLINE_EXCEEDED" and "did not answer within 50 ms" in message
    with pytest.raises(grpc.RpcError) as e:   # a method genserve does not implement
        stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(), timeout=30)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert infer(client, "gan", [1])[0].shape == (1, 28, 28)   # still serving


def test_the_client_deadline_cancels_the_work(client):
    """A gRPC deadline passes on the client: the proxy's call is cancelled, and with it the ingress's and the
    model's, so the request leaves the step batch instead of running its 1000 steps."""
    before = replica_metrics("diffusion")
    status, _ = status_of(lambda: infer(client, "diffusion", [1], parameters={"steps": 1000}, client_timeout=1.0))
    assert status == "StatusCode.DEADLINE_EXCEEDED"
    deadline = time.monotonic() + 20
    while (now := replica_metrics("diffusion"))["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, now
        time.sleep(0.1)
    assert now["running"] == 0 and now["finished"] == before["finished"]
    assert infer(client, "diffusion", [1], parameters={"steps": 2})[0].shape == (1, 28, 28)   # still serving
