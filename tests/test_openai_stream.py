"""OpenAI image streaming end to end, with the real `openai` client (`images.generate(stream=True)`) against
the session's real app: partial images from the step engine, then the completed images, identical to the
same request unstreamed; one-pass families send only completed events; bad stream fields are 400s; and a
client that closes the stream frees its request in the engine."""
from __future__ import annotations

import base64
import http.client
import json
import time

import numpy as np
import openai
import pytest

from tests.helpers import replica_metrics
from tests.test_openai_api import decode_png, images_of

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def image(event) -> np.ndarray:
    return decode_png(base64.b64decode(event.b64_json))


def test_diffusion_streams_its_partial_images_then_the_same_image_as_unstreamed(client):
    ask = dict(model="diffusion", prompt="sneaker", extra_body={"seed": 5, "steps": 10, "sampler": "ddim",
                                                                "best_effort": True})
    events = list(client.images.generate(stream=True, partial_images=3, **ask))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    partial, [done] = events[:3], events[3:]
    assert [e.partial_image_index for e in partial] == [0, 1, 2]
    assert [e.step for e in partial] == [2, 5, 8] and all(e.steps == 10 for e in partial)
    assert (done.size, done.output_format, done.model, done.class_name, done.seed) == \
           ("28x28", "png", "diffusion", "Sneaker", 5)
    assert done.policy["model"] == "diffusion"
    assert np.array_equal(image(done), images_of(client.images.generate(**ask))[0])
    # each preview is the engine's current guess at the final image: later ones are closer to it
    errors = [np.abs(image(e).astype(int) - image(done)).mean() for e in partial]
    assert errors[-1] < errors[0]
    assert partial[0].latency_ms <= partial[-1].latency_ms <= done.latency_ms


def test_each_of_n_images_streams_its_own_events(client):
    events = list(client.images.generate(model="diffusion", prompt="bag", n=2, size="56x56", stream=True,
                                         partial_images=1, extra_body={"seed": 2, "steps": 6, "best_effort": True}))
    assert [(e.type, e.image_index) for e in events] == [
        ("image_generation.partial_image", 0), ("image_generation.partial_image", 1),
        ("image_generation.completed", 0), ("image_generation.completed", 1)]
    assert all(image(e).shape == (56, 56) for e in events)


def test_a_one_pass_model_sends_only_completed_events(client):
    events = list(client.images.generate(model="gan", prompt="boot", n=2, stream=True, partial_images=3,
                                         extra_body={"seed": 1}))
    assert [(e.type, e.image_index) for e in events] == [("image_generation.completed", 0),
                                                         ("image_generation.completed", 1)]
    unstreamed = images_of(client.images.generate(model="gan", prompt="boot", n=2, extra_body={"seed": 1}))
    assert np.array_equal(np.stack([image(e) for e in events]), unstreamed)


@pytest.mark.parametrize("body, param", [
    ({"stream": True, "partial_images": 4}, "partial_images"),
    ({"stream": True, "partial_images": True}, "partial_images"),
    ({"partial_images": 2}, "partial_images"),     # only a stream carries partial images
    ({"stream": "yes"}, "stream"),
])
def test_bad_stream_fields_are_400s_naming_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model="diffusion", prompt="shirt", extra_body=body)
    assert info.value.body["param"] == param


def test_a_refused_stream_is_a_plain_429_before_any_event(client):
    with pytest.raises(openai.RateLimitError):
        list(client.images.generate(model="diffusion", prompt="shirt", stream=True, partial_images=2,
                                    extra_body={"steps": 500, "latency_slo_ms": 5}))


def test_closing_the_stream_frees_the_request_in_the_engine(server):
    before = replica_metrics("diffusion")
    body = {"model": "diffusion", "prompt": "coat", "stream": True, "partial_images": 3, "steps": 400,
            "best_effort": True}
    host, port = server["url"].removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", "/v1/images/generations", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    assert next(line for line in response if line.startswith(b"event:")) == b"event: image_generation.partial_image\n"
    connection.close()
    # closed after the first preview (step 100 of 400): the request leaves the batch at the next step
    deadline = time.monotonic() + 20
    while replica_metrics("diffusion")["cancelled"] == before["cancelled"] and time.monotonic() < deadline:
        time.sleep(0.2)
    after = replica_metrics("diffusion")
    assert after["cancelled"] == before["cancelled"] + 1 and after["finished"] == before["finished"]
    assert after["steps"] - before["steps"] < 400
