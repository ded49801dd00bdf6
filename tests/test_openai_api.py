"""The OpenAI Images API end to end: the real Ray Serve app, built from deploy/serve_config.yaml, started
once for the module on a local Ray, serving gan / vae / flow from a store built here (trained weights where
checkpoints/ has them, small random models otherwise), called with the real `openai` client. Plus the API
layer's own checks, without a server."""
from __future__ import annotations

import base64
import json
import socket
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest

from core.contracts import NULL_CLASS
from core.settings import SamplingSetting
from model_store import ModelStore
from serving.api.classes import class_from_prompt
from serving.api.errors import APIError
from serving.api.openai import parse_image_request
from serving.api.png import encode_png
from tests.helpers import MAX_BATCH, MAX_WAIT_MS, ONE_PASS, SERVED_FAMILIES, http_json, replica_metrics

FAMILIES = ONE_PASS                              # the one-pass path
# Ray Serve's own pydantic models warn on import under pydantic 2.x; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")


def decode_png(data: bytes) -> np.ndarray:
    """8-bit grayscale, filter 0 (what genserve writes) -> uint8 [H, W]; checks signature and CRCs."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,), tag = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(tag + body)
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + length
    w, h, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, color) == (8, 0)
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, w + 1)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:]


def images_of(response) -> np.ndarray:
    return np.stack([decode_png(base64.b64decode(d.b64_json)) for d in response.data])


def http(method: str, url: str, body: bytes | None = None) -> tuple[int, dict]:
    """A raw request (for what the openai client cannot send): status and decoded JSON body."""
    return http_json(method, url, body, timeout=60)

# ---- the API layer alone -------------------------------------------------------------------------------

SERVED = {"gan": "gan", "vae": "vae", "diffusion": "diffusion"}


def parse_error(body) -> APIError:
    with pytest.raises(APIError) as info:
        parse_image_request(body, SERVED)
    return info.value


def test_request_parsing():
    req = parse_image_request({"prompt": "Sneakers", "n": 2, "size": "56x56", "seed": 3}, SERVED)
    assert (req.model, req.job.class_id, req.job.n, req.job.seed, req.upscale, req.class_name) == \
           ("auto", 7, 2, 3, 2, "Sneaker")   # no model: the policy chooses
    hints = parse_image_request({"model": "auto", "quality": "hd", "goal": "latent", "best_effort": True,
                                 "max_fd": 100, "min_class_accuracy": 0.8}, SERVED).hints
    assert (hints.tier, hints.goal, hints.best_effort, hints.max_fd, hints.min_class_accuracy) == \
           ("best", "latent", True, 100, 0.8)
    assert parse_image_request({"steps": 20}, SERVED).job.setting.steps == 20   # auto: pins the diffusion settings
    assert parse_image_request({"model": "auto", "prompt": ""}, SERVED).job.class_id == NULL_CLASS
    assert parse_image_request({"model": "vae", "class_id": 9, "prompt": "a nice one"}, SERVED).job.class_id == 9
    d = parse_image_request({"model": "diffusion", "steps": 10, "sampler": "ddim", "guidance_scale": 3,
                             "latency_slo_ms": 500}, SERVED).job
    assert (d.setting, d.timeout_s) == (SamplingSetting("ddim", 10, 3.0), 0.5)


@pytest.mark.parametrize("body, status, param, message", [
    ({"model": "nope"}, 404, "model", "the model 'nope' does not exist; served models: diffusion, gan, vae"),
    ({"n": 0}, 400, "n", "n must be an integer in [1, 16], got 0"),
    ({"n": 17}, 400, "n", "n must be an integer in [1, 16], got 17"),
    ({"n": "2"}, 400, "n", "n must be an integer in [1, 16], got '2'"),
    ({"size": "30x30"}, 400, "size", "size must be '28x28' or an integer multiple of it such as '56x56' "
                                     "(at most 448x448), got '30x30'"),
    ({"response_format": "url"}, 400, "response_format",
     "response_format 'url' is not supported: genserve returns images inline; use 'b64_json'"),
    ({"prompt": "a dog"}, 400, "prompt", "prompt 'a dog' names no Fashion-MNIST class; name one of: 0 T-shirt/top"),
    ({"class_id": 11}, 400, "class_id", "class_id must be an integer in [0, 10] (10 = no class), got 11"),
    ({"class_id": 1, "prompt": "bag"}, 400, "class_id", "class_id 1 (Trouser) contradicts the prompt, which names Bag"),
    ({"seed": -1}, 400, "seed", "seed must be an integer in [0, 2**64 - 1], got -1"),
    ({"model": "gan", "steps": 10}, 400, "steps", "steps applies only to diffusion models; 'gan' is a gan model"),
    ({"quality": "ultra"}, 400, "quality", "quality must be one of draft, standard, best"),
    ({"goal": "dream"}, 400, "goal", "goal must be one of sample, likelihood, latent"),
    ({"best_effort": "yes"}, 400, "best_effort", "best_effort must be true or false"),
    ({"model": "diffusion", "steps": 0}, 400, "steps", "steps must be an integer in [1, 1000], got 0"),
    ({"model": "diffusion", "sampler": "euler"}, 400, "sampler", "sampler must be one of ddim, dpmpp_2m, got 'euler'"),
    ({"latency_slo_ms": 0}, 400, "latency_slo_ms", "latency_slo_ms must be a number > 0, got 0"),
    ({"prompt": "x" * 1001}, 400, "prompt", "prompt must be at most 1000 characters, got 1001"),
    ({"prompt": 3}, 400, "prompt", "prompt must be a string, got 3"),
    ({"seeds": 1}, 400, "seeds", "unrecognized request argument: 'seeds'"),
    ([1, 2], 400, None, "the request body must be a JSON object, got list"),
])
def test_request_errors(body, status, param, message):
    err = parse_error(body)
    assert (err.status, err.param) == (status, param)
    assert err.message.startswith(message), err.message
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def test_the_error_type_follows_the_status():
    types = {status: APIError(status, "m").body()["error"]["type"] for status in (400, 404, 429, 500, 503, 504)}
    assert types == {400: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error",
                     500: "server_error", 503: "server_error", 504: "timeout_error"}
    assert APIError(429, "m", retry_after_s=1.2).headers() == {"Retry-After": "2"}
    assert APIError(503, "m").headers() == {"Retry-After": "1"} and APIError(400, "m").headers() is None
    assert APIError(404, "no such model").v2_body() == {"error": "no such model"}


def test_prompts_name_classes():
    assert [class_from_prompt(p) for p in ("T-shirt/top", "trousers", "a Pullover", "DRESSES", "coat", "sandals",
                                           "shirt", "a pair of sneakers", "bag", "Ankle boots", "", "boots",
                                           "blue jeans")] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, NULL_CLASS, 9, 1]


def test_png_round_trip():
    img = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(decode_png(encode_png(img)), img)


# ---- the running app (tests/conftest.py starts it once per session) ------------------------------------

@pytest.fixture(scope="module")
def store(served_store) -> ModelStore:
    return served_store


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def generate(client, model, **extra):
    prompt = extra.pop("prompt", "")
    n = extra.pop("n", 1)
    return client.images.generate(model=model, prompt=prompt, n=n, size="28x28", response_format="b64_json",
                                  extra_body=extra)



def test_models_list(client, store):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == set(SERVED_FAMILIES)
    for name, m in models.items():
        assert m.object == "model" and m.owned_by == "genserve"
        assert (m.family, m.version) == (name, store.resolve(name)[1])
        assert m.path == ("one-pass" if name in ONE_PASS else "iterative") and m.threads == 1
    assert models["gan"].settings == {"max_batch_images": MAX_BATCH, "max_wait_ms": MAX_WAIT_MS}
    assert models["diffusion"].settings == {"max_batch_rows": 64, "max_waiting_rows": 256}
    assert client.models.retrieve("vae").version == store.resolve("vae")[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_is_seeded(client, store, family):
    first = generate(client, family, prompt="Sneakers", n=3, seed=11)
    again = generate(client, family, class_id=7, n=3, seed=11)
    other = generate(client, family, prompt="sneaker", n=3, seed=12)
    images = images_of(first)
    assert images.shape == (3, 28, 28) and images.dtype == np.uint8
    extra = first.model_extra
    assert (extra["model"], extra["version"], extra["family"]) == (family, store.resolve(family)[1], family)
    assert (extra["class_id"], extra["class_name"], extra["seed"]) == (7, "Sneaker", 11)
    assert extra["latency_ms"] >= extra["replica_ms"] > 0
    np.testing.assert_array_equal(images_of(again), images)                  # same seed, same images
    assert not np.array_equal(images_of(other), images)                      # another seed, others
    assert not np.array_equal(images[0], images[1])                          # n images, n draws


def test_upscaled_sizes(client):
    small, big = generate(client, "gan", seed=4), client.images.generate(
        model="gan", prompt="", size="56x56", extra_body={"seed": 4})
    np.testing.assert_array_equal(images_of(big), images_of(small).repeat(2, axis=1).repeat(2, axis=2))


def test_batch_independence(client):
    """The same request alone and amid concurrent ones gives the same images (to 1/255)."""
    alone = images_of(generate(client, "gan", prompt="bag", n=2, seed=99)).astype(int)
    before = replica_metrics("gan")["batches"]
    with ThreadPoolExecutor(8) as pool:
        others = [pool.submit(generate, client, "gan", class_id=c % 10, n=1 + c % 4, seed=1000 + c) for c in range(10)]
        target = pool.submit(generate, client, "gan", prompt="bag", n=2, seed=99)
        for f in others:
            f.result()
        amid = images_of(target.result()).astype(int)
    assert np.abs(amid - alone).max() <= 1
    after = replica_metrics("gan")
    shared = list(after["recent_batch_sizes"])[-(after["batches"] - before):]
    assert len(shared) < 11 and max(shared) > 2   # 11 requests, fewer forwards: they shared batches


def test_n_larger_than_the_max_batch(client):
    before = replica_metrics("vae")["batches"]
    big = images_of(generate(client, "vae", n=16, seed=5, prompt="coat"))
    after = replica_metrics("vae")
    assert big.shape == (16, 28, 28)
    sizes = list(after["recent_batch_sizes"])[-(after["batches"] - before):]
    assert sum(sizes) == 16 and max(sizes) <= MAX_BATCH and len(sizes) >= 2
    # the first k of a seed's images are the same whatever n is: the request's rows are one draw
    np.testing.assert_array_equal(images_of(generate(client, "vae", n=3, seed=5, prompt="coat")), big[:3])


def test_diffusion_through_the_step_engine(client, store):
    """The iterative path end to end (its engine is tested on its own): seeded, the manifest's defaults
    filled in, the request's own sampler settings honoured."""
    first = generate(client, "diffusion", prompt="trousers", n=2, seed=5, steps=3)
    again = generate(client, "diffusion", class_id=1, n=2, seed=5, steps=3)
    other = generate(client, "diffusion", prompt="trousers", n=2, seed=6, steps=3, sampler="ddim", guidance_scale=1.0)
    images = images_of(first)
    assert images.shape == (2, 28, 28)
    assert first.model_extra["settings"] == {"sampler": "dpmpp_2m", "steps": 3,
                                             "guidance_scale": store.manifest("diffusion").sampling.default.guidance_scale}
    assert first.model_extra["version"] == store.resolve("diffusion")[1]
    np.testing.assert_array_equal(images_of(again), images)
    assert other.model_extra["settings"] == {"sampler": "ddim", "steps": 3, "guidance_scale": 1.0}
    assert not np.array_equal(images_of(other), images)


def test_an_slo_nothing_can_meet_is_a_429_at_once(client):
    """Admission control: predicted to miss even on an idle replica, so rejected before any work, and
    without Retry-After (waiting would not help)."""
    start = time.monotonic()
    with pytest.raises(openai.RateLimitError) as e:
        generate(client, "diffusion", n=4, seed=1, steps=1000, latency_slo_ms=50)
    assert time.monotonic() - start < 5
    assert e.value.response.json()["error"]["code"] == "slo_unattainable"
    assert "Retry-After" not in e.value.response.headers


def test_a_missed_latency_slo_is_a_504_and_the_engine_keeps_serving(client):
    """best_effort admits what is predicted late; its deadline still holds in the engine."""
    with pytest.raises(openai.APIStatusError) as e:
        generate(client, "diffusion", n=4, seed=1, steps=1000, latency_slo_ms=50, best_effort=True)
    assert e.value.status_code == 504
    assert e.value.response.json()["error"]["code"] == "deadline_exceeded"
    assert images_of(generate(client, "diffusion", seed=2, steps=2)).shape == (1, 28, 28)


def test_auto_explains_its_choice(client):
    """model auto: the policy picks by goal, tier and SLO, and says so in the body and the headers."""
    r = client.images.with_raw_response.generate(model="auto", prompt="bag", n=1,
                                                 extra_body={"seed": 3, "goal": "latent", "latency_slo_ms": 20_000})
    body = r.parse().model_extra
    assert body["model"] == body["policy"]["model"] == "vae" == r.headers["X-Genserve-Model"]
    assert body["policy"]["slo_met"] and body["policy"]["actual_ms"] > 0 and "vae" in body["policy"]["reason"]
    loose = generate(client, "auto", prompt="bag", seed=3, latency_slo_ms=60_000).model_extra
    assert loose["family"] == "diffusion"                   # time for the best quality: a diffusion setting
    # (a tight SLO's choice depends on what the session's earlier load taught the latency model: the unit
    # tests in test_policy.py pin it on synthetic models)


def test_errors_in_openai_shape_and_the_server_keeps_serving(client, server):
    def check(exc_info, status, param, code=None):
        err = exc_info.value
        assert err.status_code == status
        body = err.response.json()["error"]
        assert set(body) == {"message", "type", "param", "code"} and body["message"]
        assert body["param"] == param and (code is None or body["code"] == code)
        assert "Traceback" not in err.response.text

    with pytest.raises(openai.NotFoundError) as e:
        generate(client, "nope")
    check(e, 404, "model", "model_not_found")
    with pytest.raises(openai.BadRequestError) as e:
        generate(client, "gan", n=0)
    check(e, 400, "n")
    with pytest.raises(openai.BadRequestError) as e:
        generate(client, "gan", prompt="a dog")
    check(e, 400, "prompt")
    with pytest.raises(openai.BadRequestError) as e:
        generate(client, "gan", class_id=12)
    check(e, 400, "class_id")
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="gan", prompt="bag", response_format="url")
    check(e, 400, "response_format")

    url = server["url"] + "/v1/images/generations"
    for raw in (b"{not json", b"", b"\xff\xfe"):
        status, body = http("POST", url, raw)
        assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = http("GET", server["url"] + "/v1/nothing")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}

    assert images_of(generate(client, "flow", seed=1)).shape == (1, 28, 28)   # still serving


def _deploy_gan_batching(client, server, settings: dict) -> None:
    from genserve.launch import deploy_local

    for d in server["config"]["applications"][0]["deployments"]:
        if d["name"] == "gan":
            d["user_config"] = settings
    deploy_local(server["config"], timeout_s=120)
    deadline = time.monotonic() + 60  # the controller hands the new user_config to the replica just after
    while (gan := client.models.retrieve("gan")).settings != settings:
        assert time.monotonic() < deadline, gan.settings
        time.sleep(0.2)


def test_reconfigure_max_batch_live(client, server):
    """A new user_config in the same config file reaches the running replica (no restart)."""
    version_before = client.models.retrieve("gan").version
    _deploy_gan_batching(client, server, {"max_batch_images": 2, "max_wait_ms": 2})
    try:
        assert client.models.retrieve("gan").version == version_before
        before = replica_metrics("gan")["batches"]
        assert images_of(generate(client, "gan", n=5, seed=3)).shape == (5, 28, 28)
        after = replica_metrics("gan")
        assert list(after["recent_batch_sizes"])[-(after["batches"] - before):] == [2, 2, 1]
    finally:  # the app is shared by the session's other modules
        _deploy_gan_batching(client, server, {"max_batch_images": MAX_BATCH, "max_wait_ms": MAX_WAIT_MS})


def test_client_disconnect_frees_the_step_batch_slot(server, client):
    """A client that hangs up mid-generation: Serve cancels the ingress call, the cancellation reaches the
    iterative replica, and the request leaves the batch at the next step instead of running 1000 steps."""
    before = replica_metrics("diffusion")
    body = json.dumps({"model": "diffusion", "prompt": "bag", "n": 2, "seed": 1, "steps": 1000,
                       "best_effort": True}).encode()
    host, port = server["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 30
        while replica_metrics("diffusion")["running"] == 0:   # wait until it is in the step batch
            assert time.monotonic() < deadline
            time.sleep(0.05)
    hung_up = time.monotonic()
    while (now := replica_metrics("diffusion"))["cancelled"] == before["cancelled"]:
        assert time.monotonic() - hung_up < 20, now
        time.sleep(0.1)
    assert now["running"] == 0 and now["finished"] == before["finished"]
    assert images_of(generate(client, "diffusion", seed=2, steps=2)).shape == (1, 28, 28)  # still serving


def test_pixelcnn_through_the_step_engine(client, store):
    """PixelCNN's 784 pixel steps through the engine: seeded, and requests at different pixel positions
    share forwards (the second joins while the first is mid-image)."""
    before = replica_metrics("pixelcnn")
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(generate, client, "pixelcnn", prompt="trousers", seed=3)
        time.sleep(0.5)
        second = pool.submit(generate, client, "pixelcnn", prompt="bag", n=2, seed=4)
        a, b = images_of(first.result()), images_of(second.result())
    after = replica_metrics("pixelcnn")
    assert a.shape == (1, 28, 28) and b.shape == (2, 28, 28)
    assert first.result().model_extra["version"] == store.resolve("pixelcnn")[1]
    assert after["steps"] - before["steps"] < 2 * 784   # they shared forwards
    np.testing.assert_array_equal(images_of(generate(client, "pixelcnn", class_id=1, seed=3)), a)


def test_an_api_error_survives_pickling_whole():
    """Ray carries exceptions between processes by pickling them: every field must come back."""
    import pickle

    error = APIError(429, "busy", param="latency_slo_ms", code="slo_unreachable", retry_after_s=2.5)
    back = pickle.loads(pickle.dumps(error))
    assert (back.status, back.message, back.param, back.code, back.retry_after_s, back.type, str(back)) == \
           (429, "busy", "latency_slo_ms", "slo_unreachable", 2.5, error.type, "busy")
