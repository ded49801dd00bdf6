"""KServe v2 / Open Inference Protocol over HTTP, end to end with Triton's real client (tritonclient.http):
health, metadata, Triton's config and statistics, inference on every served model in JSON and with the
binary tensor extension, per-image seeds, parameters, and errors in KServe's shape. The app is the session's
(tests/conftest.py). Plus the v2 layer's own checks, without a server."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from core.contracts import NULL_CLASS
from serving.api.errors import APIError
from serving.api.jobs import GenerationJob
from serving.api.kserve import decode_input, parse_infer
from tests.helpers import SERVED_FAMILIES, http_json

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's and gevent's, not ours
FAMILIES = {"gan": "gan", "vae": "vae", "diffusion": "diffusion"}
FAST = {"diffusion": {"steps": 2},   # per model: parameters that keep the test fast, and pin
        "auto": {"goal": "latent"}}   # auto to the one model that does latent work, the VAE


# ---- the v2 layer alone ----------------------------------------------------------------------------------

def parse(inputs, parameters=None, name="gan", outputs=()):
    decoded = [decode_input(*t) for t in inputs]
    return parse_infer(name, "", "", decoded, parameters or {}, list(outputs), FAMILIES)


def error_of(fn, *args, **kwargs) -> APIError:
    with pytest.raises(APIError) as info:
        fn(*args, **kwargs)
    return info.value


def test_a_request_is_one_job_with_a_seed_and_class_per_image():
    req = parse([("class_id", "INT64", [3], [NULL_CLASS, 7, 7]), ("seed", "INT64", [3], [5, 9, 5])],
                {"steps": 4, "sampler": "ddim", "latency_slo_ms": 800}, name="diffusion")
    assert req.model == "diffusion" and req.drawn_seed is None
    [job] = req.jobs
    assert (job.n, job.seeds, job.class_ids) == (3, (5, 9, 5), (NULL_CLASS, 7, 7))
    assert job.class_id == 7   # admission's: a guided conditional image takes two rows
    assert (job.setting.steps, job.setting.sampler, job.timeout_s) == (4, "ddim", 0.8)
    # one class for every image: no per-image classes; one image: the plain 1-image job
    assert parse([("class_id", "INT64", [2], [4, 4])]).jobs[0].class_ids is None
    assert parse([("class_id", "INT64", [1], [NULL_CLASS]), ("seed", "INT64", [1], [3])]).jobs == \
           (GenerationJob(class_id=NULL_CLASS, n=1, seed=3),)
    # PixelCNN (and auto, which may choose it) too: its stepper draws each image from its own seed as well
    for name in ("pixelcnn", "auto"):
        [job] = parse_infer(name, "", "", [("class_id", [1, 2]), ("seed", [5, 6])], {}, [],
                            {**FAMILIES, "pixelcnn": "pixelcnn"}).jobs
        assert (job.n, job.seeds, job.class_ids) == (2, (5, 6), (1, 2))
    # raw little-endian bytes (binary extension, gRPC raw contents) and nested JSON decode alike
    assert decode_input("class_id", "INT64", [2], np.array([1, 2], "<i8").tobytes()) == ("class_id", [1, 2])
    assert decode_input("seed", "INT64", [2], [[1], [2]]) == ("seed", [1, 2])


def test_absent_seeds_are_drawn_once_and_numbered():
    req = parse([("class_id", "INT64", [3], [1, 1, 1])], name="auto")
    assert req.model == req.name == "auto"   # the policy chooses at the ingress
    assert req.jobs[0].seeds == tuple(req.drawn_seed + i for i in range(3))


def test_triton_timeout_tightens_the_slo():
    req = parse([("class_id", "INT64", [1], [1])], {"latency_slo_ms": 500, "timeout": 200_000})
    assert req.jobs[0].timeout_s == 0.2


@pytest.mark.parametrize("tensor, message", [
    (("class_id", "FP32", [1], [1.0]), "input 'class_id' must be INT64, got 'FP32'"),
    (("class_id", "INT64", [1, 1], [1]), "input 'class_id' must have shape [n] with 1 <= n <= 16"),
    (("class_id", "INT64", [17], [1] * 17), "input 'class_id' must have shape [n] with 1 <= n <= 16"),
    (("class_id", "INT64", [2], [1]), "input 'class_id': shape [2] needs 2 values, got 1"),
    (("class_id", "INT64", [2], [1, 2.5]), "input 'class_id': data must be a list of INT64 integers"),
    (("class_id", "INT64", [1], [True]), "input 'class_id': data must be a list of INT64 integers"),
    (("class_id", "INT64", [1], b"\x01"), "input 'class_id': shape [1] INT64 takes 8 bytes, got 1"),
    (("prompt", "BYTES", [1], [b"bag"]), "unknown input 'prompt'; inputs: class_id INT64 [-1], seed INT64 [-1]"),
])
def test_bad_tensors(tensor, message):
    err = error_of(decode_input, *tensor)
    assert err.status == 400 and err.message.startswith(message), err.message


@pytest.mark.parametrize("inputs, parameters, name, status, message", [
    ([("class_id", "INT64", [1], [11])], {}, "gan", 400, "class_id must be an integer in [0, 10]"),
    ([("seed", "INT64", [1], [1])], {}, "gan", 400, "input 'class_id' is required"),
    ([("class_id", "INT64", [2], [1, 2]), ("seed", "INT64", [1], [1])], {}, "gan", 400,
     "input 'seed' must have the shape of 'class_id'"),
    ([("class_id", "INT64", [1], [1]), ("seed", "INT64", [1], [-1])], {}, "gan", 400, "seed must be an integer"),
    ([("class_id", "INT64", [1], [1])], {"steps": 2}, "gan", 400, "steps applies only to diffusion models"),
    ([("class_id", "INT64", [1], [1])], {"sampler": "euler"}, "diffusion", 400, "sampler must be one of ddim"),
    ([("class_id", "INT64", [1], [1])], {"latency_slo_ms": 0}, "gan", 400, "latency_slo_ms must be a number > 0"),
    ([("class_id", "INT64", [1], [1])], {"timeout": -5}, "gan", 400, "timeout (microseconds, 0 = none) must be"),
    ([("class_id", "INT64", [1], [1])], {"goal": "dream"}, "auto", 400, "goal must be one of sample"),
    ([("class_id", "INT64", [1], [1])], {"quality": "great"}, "auto", 400, "quality must be one of draft"),
    ([("class_id", "INT64", [1], [1])], {"seeds": 1}, "gan", 400, "unknown parameter 'seeds'"),
    ([("class_id", "INT64", [1], [1])], {}, "nope", 404, "the model 'nope' does not exist"),
])
def test_bad_requests(inputs, parameters, name, status, message):
    err = error_of(parse, inputs, parameters, name)
    assert (err.status, err.message[:len(message)]) == (status, message), err.message


def test_unknown_outputs():
    assert error_of(parse, [("class_id", "INT64", [1], [1])], outputs=["logits"]).message.startswith(
        "unknown output 'logits'; outputs: image UINT8 [-1, 28, 28]")


# ---- the running app ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(server) -> httpclient.InferenceServerClient:
    c = httpclient.InferenceServerClient(server["url"].removeprefix("http://"), concurrency=4,
                                         network_timeout=120)
    yield c
    c.close()


def inputs(class_ids, seeds=None, binary=True) -> list[httpclient.InferInput]:
    tensors = [("class_id", class_ids)] + ([("seed", seeds)] if seeds is not None else [])
    out = []
    for name, values in tensors:
        t = httpclient.InferInput(name, [len(values)], "INT64")
        t.set_data_from_numpy(np.asarray(values, np.int64), binary_data=binary)
        out.append(t)
    return out


def infer(client, model, class_ids, seeds=None, binary=True, **parameters):
    """(images, response): images uint8 [n, 28, 28]."""
    result = client.infer(model, inputs(class_ids, seeds, binary),
                          outputs=[httpclient.InferRequestedOutput("image", binary_data=binary)],
                          parameters=parameters or None)
    return result.as_numpy("image"), result.get_response()


def raw(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    return http_json(method, url, body, headers or {}, timeout=60)

def status_of(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call()
    assert "Traceback" not in info.value.message()
    return info.value.status(), info.value.message()


def test_health_and_server_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "genserve" and meta["version"]
    assert meta["extensions"] == ["binary_tensor_data", "parameters", "model_configuration", "statistics"]


@pytest.mark.parametrize("model", [*SERVED_FAMILIES, "auto"])
def test_model_metadata_config_and_readiness(client, served_store, model):
    version = "" if model == "auto" else served_store.resolve(model)[1]
    assert client.is_model_ready(model) and client.is_model_ready(model, version)
    meta = client.get_model_metadata(model)
    assert meta == {"name": model, "versions": [version] if version else [], "platform": "genserve",
                    "inputs": [{"name": "class_id", "datatype": "INT64", "shape": [-1]},
                               {"name": "seed", "datatype": "INT64", "shape": [-1]}],
                    "outputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, 28, 28]}]}
    config = client.get_model_config(model, version)
    assert (config["name"], config["backend"], config["max_batch_size"]) == (model, "onnxruntime", 0)
    assert [(i["name"], i["data_type"], i["dims"], i["optional"]) for i in config["input"]] == \
           [("class_id", "TYPE_INT64", [-1], False), ("seed", "TYPE_INT64", [-1], True)]
    assert [(o["name"], o["data_type"], o["dims"]) for o in config["output"]] == [("image", "TYPE_UINT8", [-1, 28, 28])]
    if model != "auto":
        assert not client.is_model_ready(model, "000000000000")
        assert status_of(lambda: client.get_model_metadata(model, "000000000000"))[0] == "404"


# pixelcnn (784 engine steps an image) is tested in JSON and binary in test_kserve_grpc.py, at once with gRPC's
# two encodings, so that the four requests share their steps
@pytest.mark.parametrize("model", [m for m in SERVED_FAMILIES if m != "pixelcnn"] + ["auto"])
def test_infer_json_and_binary_give_the_same_images(client, served_store, model):
    params = FAST.get(model, {})
    as_json, response = infer(client, model, [7, 7, NULL_CLASS], [11, 12, 11], binary=False, **params)
    as_binary, _ = infer(client, model, [7, 7, NULL_CLASS], [11, 12, 11], binary=True, **params)
    assert as_json.shape == (3, 28, 28) and as_json.dtype == np.uint8
    np.testing.assert_array_equal(as_binary, as_json)
    served = "vae" if model == "auto" else model       # goal latent: the VAE
    assert (response["model_name"], response["model_version"]) == (served, served_store.resolve(served)[1])
    assert response["parameters"]["family"] == served and "seed" not in response["parameters"]
    assert not np.array_equal(as_json[0], as_json[1])   # another seed, another image
    # image i depends only on its own class and seed: alone, or at another position, it is the same
    alone, _ = infer(client, model, [7], [12], **params)
    np.testing.assert_array_equal(alone[0], as_json[1])


@pytest.mark.parametrize("model, parameters", [("gan", {}), ("diffusion", {"steps": 3, "guidance_scale": 2.0})])
def test_n_images_in_one_request_are_the_n_one_image_answers(client, model, parameters):
    """One job of n images with a seed and class each is, image for image and byte for byte, n 1-image
    requests: a classless image beside guided ones, a seed twice, and a 64-bit seed."""
    classes, seeds = [3, NULL_CLASS, 3, 8], [21, 22, 21, 2**63 - 1]
    together, _ = infer(client, model, classes, seeds, **parameters)
    alone = [infer(client, model, [c], [s], **parameters)[0][0] for c, s in zip(classes, seeds)]
    np.testing.assert_array_equal(together, np.stack(alone))
    assert not np.array_equal(together[0], together[3])


def test_drawn_seed_makes_the_images_again(client):
    images, response = infer(client, "vae", [2, 2])
    seed = response["parameters"]["seed"]
    np.testing.assert_array_equal(infer(client, "vae", [2, 2], [seed, seed + 1])[0], images)


def test_parameters_are_honoured(client, served_store):
    ddim, response = infer(client, "diffusion", [1], [5], sampler="ddim", steps=3, guidance_scale=1.0)
    assert {k: response["parameters"][k] for k in ("sampler", "steps", "guidance_scale")} == \
           {"sampler": "ddim", "steps": 3, "guidance_scale": 1.0}
    dpm, response = infer(client, "diffusion", [1], [5], steps=3)
    assert response["parameters"]["sampler"] == "dpmpp_2m"
    assert not np.array_equal(ddim, dpm)


def test_outputs_default_to_binary(server):
    """Triton's rule: a request that names no outputs gets them all, binary when binary_data_output is set."""
    body = json.dumps({"inputs": [{"name": "class_id", "datatype": "INT64", "shape": [1], "data": [4]},
                                  {"name": "seed", "datatype": "INT64", "shape": [1], "data": [8]}],
                       "parameters": {"binary_data_output": True}}).encode()
    req = urllib.request.Request(server["url"] + "/v2/models/gan/infer", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        header_length, payload = int(r.headers["Inference-Header-Content-Length"]), r.read()
    header = json.loads(payload[:header_length])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 784} and "data" not in header["outputs"][0]
    assert len(payload) == header_length + 784


def test_statistics(client, served_store):
    before = client.get_inference_statistics("flow")["model_stats"][0]
    infer(client, "flow", [1, 2, 3])
    after = client.get_inference_statistics("flow")["model_stats"][0]
    assert (after["name"], after["version"]) == ("flow", served_store.resolve("flow")[1])
    assert after["inference_count"] - before["inference_count"] == 3
    assert after["execution_count"] - before["execution_count"] == 1
    success = after["inference_stats"]["success"]
    assert success["count"] - before["inference_stats"]["success"]["count"] == 1 and success["ns"] > 0
    assert {s["name"] for s in client.get_inference_statistics()["model_stats"]} == set(SERVED_FAMILIES)


def test_versions(client, served_store):
    version = served_store.resolve("gan")[1]
    assert client.infer("gan", inputs([1]), model_version=version).get_response()["model_version"] == version
    for model, wrong in (("gan", "000000000000"), ("auto", version)):
        status, message = status_of(lambda: client.infer(model, inputs([1]), model_version=wrong))
        assert status == "404" and "version" in message


def test_errors_and_the_server_keeps_serving(client, server):
    assert status_of(lambda: infer(client, "nope", [1]))[0] == "404"
    bad_dtype = httpclient.InferInput("class_id", [1], "INT32")
    bad_dtype.set_data_from_numpy(np.array([1], np.int32))
    assert status_of(lambda: client.infer("gan", [bad_dtype])) == ("400", "input 'class_id' must be INT64, got 'INT32'")
    bad_shape = httpclient.InferInput("class_id", [1, 1], "INT64")
    bad_shape.set_data_from_numpy(np.array([[1]], np.int64))
    assert status_of(lambda: client.infer("gan", [bad_shape]))[0] == "400"
    assert status_of(lambda: infer(client, "gan", [12]))[0] == "400"
    assert status_of(lambda: infer(client, "gan", [1], steps=2))[0] == "400"
    status, message = status_of(lambda: infer(client, "diffusion", [1, 2], steps=1000, latency_slo_ms=50))
    assert status == "429" and "no candidate can finish within the SLO" in message   # refused at once
    status, message = status_of(lambda: infer(client, "diffusion", [1, 2], steps=1000, latency_slo_ms=50,
                                              best_effort=True))
    assert status == "504" and "did not answer within 50 ms" in message

    url = server["url"] + "/v2/models/gan/infer"
    class_id = {"name": "class_id", "datatype": "INT64", "shape": [1], "data": [1]}
    for body, headers in ((b"{not json", {}), (b"[]", {}), (b'{"inputs": []}', {}),
                          (b'{"inputs": [], "wat": 1}', {}), (b"{}", {"Inference-Header-Content-Length": "99"}),
                          (json.dumps({"inputs": [class_id], "parameters": {"binary_data_output": 1}}).encode(), {}),
                          (json.dumps({"inputs": [class_id], "outputs": [{"name": "image", "parameters":
                                                                          {"classification": 3}}]}).encode(), {}),
                          (json.dumps({"inputs": [{**class_id, "parameters": {"binary_data_size": 8}}]}).encode(),
                           {})):
        status, answer = raw("POST", url, body, headers)
        assert status == 400 and set(answer) == {"error"} and answer["error"], (body, answer)
    status, answer = raw("GET", server["url"] + "/v2/nothing")
    assert status == 404 and set(answer) == {"error"}
    for method, path, body in (("GET", "/v2/models/nope", None), ("POST", "/v2/models/nope/infer", b"{}")):
        status, answer = raw(method, server["url"] + path, body)
        assert status == 404 and "served models" in answer["error"]

    assert infer(client, "diffusion", [1], steps=2)[0].shape == (1, 28, 28)   # still serving
