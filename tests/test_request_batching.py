"""The request-level @serve.batch baseline (serving/request_batching.py), as the benchmarks run it: a second
application in the session's Serve instance, `batching: request`, serving gan and diffusion from the same
store. It must give the same images as genserve's own paths, so the benchmarks compare batching only."""
from __future__ import annotations

import base64
import copy
import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.test_openai_api import decode_png

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def images(body: dict) -> list:
    return [decode_png(base64.b64decode(d["b64_json"])).tolist() for d in body["data"]]


@pytest.fixture(scope="module")
def baseline(server):
    from genserve.launch import deploy_local

    config = copy.deepcopy(server["config"])
    app = copy.deepcopy(config["applications"][0])
    app.update(name="baseline", route_prefix="/baseline")
    app["args"] = {**app["args"], "batching": "request", "admission": False,
                   "models": ["gan@latest", "diffusion@latest"]}
    app["deployments"] = [{**d, "ray_actor_options": {"num_cpus": 0}}  # the session app holds Ray's CPUs
                          for d in app["deployments"] if d["name"] in ("Ingress", "gan", "diffusion")]
    config["applications"].append(app)
    deploy_local(config, timeout_s=240)
    try:
        yield server["url"] + "/baseline/v1/images/generations"
    finally:
        deploy_local(server["config"], timeout_s=240)   # back to the session's one application


def test_the_baseline_serves_the_same_images(server, baseline):
    ours = server["url"] + "/v1/images/generations"
    for body in ({"model": "gan", "prompt": "coat", "n": 3, "seed": 7},
                 {"model": "diffusion", "prompt": "bag", "n": 2, "seed": 7, "steps": 4}):
        a, b = post(ours, body), post(baseline, body)
        assert images(a) == images(b)
        assert (a["model"], a["version"], a["settings"]) == (b["model"], b["version"], b["settings"])


def _short_during_long(url: str) -> tuple[float, float]:
    """A 300-step request, then 0.3 s into it a 2-step one: their replica_ms (time at the model replica)."""
    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(post, url, {"model": "diffusion", "prompt": "shirt", "seed": 1, "steps": 300})
        time.sleep(0.3)
        short = post(url, {"model": "diffusion", "prompt": "shirt", "seed": 2, "steps": 2})
        return short["replica_ms"], long.result()["replica_ms"]


def test_a_request_never_joins_a_running_request_batch(server, baseline):
    """The difference the benchmarks measure: in the baseline a short request that arrives while a batch
    runs waits for all of it; in the step engine it joins at the next step and leaves when done."""
    short, long = _short_during_long(baseline)
    assert short > 0.5 * long, (short, long)
    short, long = _short_during_long(server["url"] + "/v1/images/generations")
    assert short < 0.5 * long, (short, long)
