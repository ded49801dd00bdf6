"""Replica health and graceful shutdown, on a second Serve application of its own ("health", under
/health-app, gan and diffusion from a private copy of the session's store), deleted at the end:

- a model whose artifact was tampered with after publishing degrades only itself: the application deploys,
  its replica stays up without a model, /v2/health/ready is a 503 naming it (and why, without host paths),
  its v2 model-ready is a 503, its requests a 503 at once, genserve_model_ready 0 in the metrics; the other
  model serves. (A replica constructor that raised would be retried by Serve and then mark the whole
  application DEPLOY_FAILED.)
- every deployment answers Serve's health check (check_health: a batch-1 forward on the model replicas);
- a redeploy that restarts a replica lets its in-flight requests finish (graceful_shutdown_timeout_s).
"""
from __future__ import annotations

import asyncio
import copy
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from model_store import ModelStore
from serving.errors import ModelUnavailable, unless_unavailable
from serving.config import OnePassConfig
from serving.onepass.batcher import ImageBatcher
from tests.helpers import http_json, metric_samples, replica_names, timed_post

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's, not ours

NAME, PREFIX = "health", "/health-app"
TAMPERED, HEALTHY = "gan", "diffusion"




# ---- no server ---------------------------------------------------------------------------------------------

def test_a_load_error_is_answered_without_host_paths():
    cause = OSError("model gan version 1a2b: file generate.onnx does not match its manifest hash: expected sha256 "
                    "ab (10 bytes), got sha256 cd (10 bytes) from /srv/store/gan/1a2b/generate.onnx; refusing")
    error = ModelUnavailable.of("gan", cause)
    assert "/srv" not in str(error) and "from <store>; refusing" in str(error)
    assert str(error).startswith("model gan is not available: it failed to load (OSError: model gan version 1a2b")

    class Replica:
        load_error = error

        @unless_unavailable
        async def generate(self):
            return "images"

    with pytest.raises(ModelUnavailable, match="failed to load"):
        asyncio.run(Replica().generate())
    Replica.load_error = None
    assert asyncio.run(Replica().generate()) == "images"


def test_a_dead_batching_loop_is_reported():
    """What check_health reads: a batching loop that died (only a bug ends it) has its exception."""
    async def main():
        async def forward(feeds):
            return feeds["x"]

        batcher = ImageBatcher(forward, OnePassConfig(max_batch_images=2, max_wait_ms=0))
        assert batcher.loop_error is None
        assert (await batcher.submit({"x": np.arange(2)})).tolist() == [0, 1]
        assert batcher.loop_error is None                       # running fine
        batcher._take = lambda: 1 / 0                           # a bug in the loop itself
        waiter = asyncio.ensure_future(batcher.submit({"x": np.arange(1)}))
        await asyncio.sleep(0.05)
        assert isinstance(batcher.loop_error, ZeroDivisionError)
        waiter.cancel()

    asyncio.run(main())


# ---- the private application ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def private(server, served_store, tmp_path_factory):
    """The session's store copied (gan and diffusion), gan's graph overwritten by one byte after publishing,
    served as a second application beside the session's; the session's config is restored after."""
    from genserve.launch import deploy_local

    root = tmp_path_factory.mktemp("health") / "store"
    for model in (TAMPERED, HEALTHY):
        shutil.copytree(Path(served_store.uri) / model, root / model)
    store = ModelStore.open(root)
    model, version = store.resolve(TAMPERED)
    onnx = root / model / version / store.manifest(TAMPERED).graph("generate").onnx_file
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))

    config = copy.deepcopy(server["config"])
    app = copy.deepcopy(config["applications"][0])
    app.update(name=NAME, route_prefix=PREFIX)
    app["args"] = {**app["args"], "store": str(root), "models": [f"{TAMPERED}@latest", f"{HEALTHY}@latest"]}
    app["deployments"] = [{**d, "ray_actor_options": {"num_cpus": 0}}  # the session app holds Ray's CPUs
                          for d in app["deployments"] if d["name"] in ("Ingress", TAMPERED, HEALTHY)]
    config["applications"].append(app)
    deploy_local(config, timeout_s=240)   # raises unless every application is RUNNING
    try:
        yield {"url": server["url"] + PREFIX, "config": config, "root": root, "metrics_port": server["metrics_port"]}
    finally:
        deploy_local(server["config"], timeout_s=240)   # back to the session's one application



def model_ready_metric(metrics_port: int) -> dict[str, float]:
    """model -> genserve_model_ready of this application's replicas, as Ray exports it."""
    return {labels["model"]: value for labels, value in metric_samples(metrics_port, "ray_genserve_model_ready")
            if labels.get("application") == NAME}


def replica_retries(metrics_port: int) -> float:
    """The ingress's retries of this application's calls whose replica died (genserve_replica_retries_total)."""
    return sum(value for labels, value in metric_samples(metrics_port, "ray_genserve_replica_retries_total")
               if labels.get("application") == NAME)


def test_a_tampered_model_degrades_only_itself(server, private):
    from ray import serve

    assert serve.status().applications[NAME].status == "RUNNING"
    status, body = http_json("GET", f"{private['url']}/v2/health/ready", timeout=60)
    assert status == 503 and body["ready"] is False and set(body["not_ready"]) == {TAMPERED}, body
    reason = body["not_ready"][TAMPERED]
    assert "IntegrityError" in reason and "does not match its manifest hash" in reason, reason
    assert str(private["root"]) not in json.dumps(body)                      # no host path answered
    assert http_json("GET", f"{private['url']}/v2/models/{TAMPERED}/ready", timeout=60)[0] == 503
    assert http_json("GET", f"{private['url']}/v2/models/{HEALTHY}/ready", timeout=60) == (200, {"name": HEALTHY, "ready": True})

    url = f"{private['url']}/v1/images/generations"
    status, body, seconds = timed_post(url, {"model": TAMPERED, "prompt": "bag", "seed": 1}, timeout=180)
    assert status == 503 and body["error"]["code"] == "model_unavailable" and seconds < 5, body
    assert "IntegrityError" in body["error"]["message"] and str(private["root"]) not in body["error"]["message"]
    status, body, _ = timed_post(url, {"model": HEALTHY, "prompt": "bag", "seed": 1, "steps": 4}, timeout=180)
    assert status == 200 and len(body["data"]) == 1                          # the other model serves
    assert http_json("GET", f"{server['url']}/v2/health/ready", timeout=60) == (200, {"ready": True})  # and the session's app is untouched

    deadline = time.monotonic() + 30                                           # exported every second
    while (ready := model_ready_metric(server["metrics_port"])) != {TAMPERED: 0.0, HEALTHY: 1.0}:
        assert time.monotonic() < deadline, ready
        time.sleep(1)


def test_every_replica_answers_its_health_check(private):
    """Serve calls check_health itself every health_check_period_s; here it is called directly: the tampered
    replica passes too (a restart cannot mend it; it reports itself instead)."""
    from ray import serve

    for deployment in ("Ingress", TAMPERED, HEALTHY):
        handle = serve.get_deployment_handle(deployment, app_name=NAME)
        assert handle.check_health.remote().result(timeout_s=30) is None
    details = serve.status().applications[NAME].deployments
    assert {name: d.status for name, d in details.items()} == dict.fromkeys(("Ingress", TAMPERED, HEALTHY), "HEALTHY")


def test_a_redeploy_lets_in_flight_requests_finish(private):
    """A changed ray_actor_options restarts the diffusion replica (a user_config change would not: it is
    applied live); the requests it is serving finish on the old replica, which Serve stops only then."""
    from genserve.launch import deploy_local

    url = f"{private['url']}/v1/images/generations"
    long = {"model": HEALTHY, "prompt": "sneaker", "n": 8, "guidance_scale": 2.0, "steps": 150,
            "best_effort": True}  # longer than the default SLO: served however long it takes
    old = replica_names(NAME, HEALTHY)
    changed = copy.deepcopy(private["config"])
    for d in changed["applications"][-1]["deployments"]:
        if d["name"] == HEALTHY:
            d["ray_actor_options"] = {**d["ray_actor_options"], "runtime_env": {"env_vars": {"GENSERVE_REDEPLOY": "1"}}}
    retries = replica_retries(private["metrics_port"])
    with ThreadPoolExecutor(2) as pool:
        calls = [pool.submit(timed_post, url, {**long, "seed": i}, timeout=180) for i in range(2)]
        time.sleep(1.0)                                       # in the old replica's step batch by now
        assert not any(c.done() for c in calls)
        start = time.monotonic()
        deploy_local(changed, timeout_s=240)                  # returns once the new replica is up
        print(f"redeployed in {time.monotonic() - start:.1f} s")
        if not all(c.done() for c in calls):                  # the old replica drains, still alive
            assert set(old) <= set(replica_names(NAME, HEALTHY)), (old, replica_names(NAME, HEALTHY))
        answers = [c.result() for c in calls]
    print("in-flight requests took", [round(a[2], 1) for a in answers], "s")
    assert [a[0] for a in answers] == [200, 200], [a[1] for a in answers]
    assert all(len(a[1]["data"]) == 8 for a in answers)
    time.sleep(2.5)                                           # the metrics' export interval, twice
    assert replica_retries(private["metrics_port"]) == retries   # served where they started: no retry
    deadline = time.monotonic() + 60
    while (new := replica_names(NAME, HEALTHY)) == old or len(new) != 1:   # the old one is gone once drained
        assert time.monotonic() < deadline, (old, new)
        time.sleep(0.5)
    assert timed_post(url, {"model": HEALTHY, "prompt": "bag", "seed": 2, "steps": 4}, timeout=180)[0] == 200   # the new one serves
