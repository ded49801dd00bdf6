"""A model replica dies under a request (ray.kill, as a crash or a lost node would): the ingress sends the
same seeded job again, Serve brings up a replacement, and the client gets its 200 with the very image an
undisturbed run gives; the retry is counted in the metrics. On the session's shared app (one replica per
model), so the retry waits for the replacement — on a cluster it goes to the surviving replica at once."""
from __future__ import annotations

import base64
import os
import signal
import threading
import time

import pytest
import ray
from ray import serve

from tests.helpers import APP, http_json, metric_samples, replica_names

# PixelCNN: one forward per pixel, ~2-4 s an image here, so there is time to kill its replica mid-request
BODY = {"model": "pixelcnn", "prompt": "trouser", "n": 1, "seed": 4242}


def replica_actor(model: str):
    names = replica_names(APP, model)
    assert len(names) == 1, names
    return ray.get_actor(names[0], namespace="serve")


def retries_counted(metrics_port: int, model: str) -> float:
    return sum(value for labels, value in metric_samples(metrics_port, "ray_genserve_replica_retries_total")
               if labels.get("model") == model)


def kill(actor, how: str) -> None:
    """ray.kill (what Serve's controller would see as a crashed actor), or SIGKILL to the replica's process, as
    the kernel's OOM killer or a lost machine would."""
    if how == "ray.kill":
        ray.kill(actor, no_restart=True)
    else:
        from ray._private.state import actors  # the GCS's actor table; the state API needs a dashboard

        os.kill(actors(actor._actor_id.hex())["Pid"], signal.SIGKILL)


@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_a_replica_killed_mid_request_is_retried_with_the_same_image(server, how):
    url = f"{server['url']}/v1/images/generations"
    status, undisturbed = http_json("POST", url, BODY)
    assert status == 200

    answer: dict = {}
    call = threading.Thread(target=lambda: answer.update(zip(("status", "body"), http_json("POST", url, BODY, timeout=180))))
    call.start()
    engine = serve.get_deployment_handle("pixelcnn", app_name=APP)
    while engine.metrics.remote().result(timeout_s=30).running == 0:   # it is in the step batch: mid-request
        assert call.is_alive()
        time.sleep(0.05)
    victim = replica_actor("pixelcnn")
    before = retries_counted(server["metrics_port"], "pixelcnn")
    kill(victim, how)
    call.join(timeout=200)

    assert not call.is_alive()
    assert answer["status"] == 200, answer["body"]
    assert base64.b64decode(answer["body"]["data"][0]["b64_json"]) == \
           base64.b64decode(undisturbed["data"][0]["b64_json"])           # same seed, same image, after the retry
    assert replica_actor("pixelcnn")._actor_id != victim._actor_id        # a replacement serves
    deadline = time.monotonic() + 30                                      # exported every second
    while retries_counted(server["metrics_port"], "pixelcnn") < before + 1:
        assert time.monotonic() < deadline, "the retry never reached the metrics"
        time.sleep(1)
