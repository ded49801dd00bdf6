"""Overload: every queue in front of a model is bounded (Serve's max_ongoing_requests / max_queued_requests on
every deployment, the step engine's max_waiting_rows), and past a bound a request is refused at once with
503 + Retry-After (gRPC RESOURCE_EXHAUSTED) instead of queueing past its deadline; what was admitted still
completes, and the server serves as before once the flood ends. The flood runs on the session's app
(tests/conftest.py) with the shipped bounds; `python -m benchmarks.overload` measures 3x capacity for a minute."""
from __future__ import annotations

import json
import statistics
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from ray.serve.exceptions import BackPressureError

from genserve.launch import load_config
from serving.api.errors import APIError
from serving.config import IterativeConfig
from serving.engine.scheduler import Scheduler
from serving.engine.state import RequestState
from serving.errors import EngineOverloaded
from tests.helpers import replica_metrics

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's, not ours

# 16 guided images: 32 rows, half the row budget. With the shipped bound (64 rows running, 256 waiting) ten
# such requests fit; a flood of FLOOD is refused from the eleventh on. 20 steps (~3 s a pair here) keep the
# queue full long enough to probe it.
# best_effort: past the default SLO the policy would refuse them first (429); these tests are about the
# engine's own bound behind it
WIDE = {"model": "diffusion", "prompt": "bag", "n": 16, "guidance_scale": 2.0, "steps": 20, "best_effort": True}
FLOOD = 36


# ---- no server ---------------------------------------------------------------------------------------------

def _state(i: int, rows: int) -> RequestState:
    return RequestState(f"r{i}", n=rows, rows=rows, steps_total=3, arrival=0.0)


def test_the_engine_refuses_past_its_waiting_bound():
    sched = Scheduler(max_rows=4, max_waiting_rows=4)
    sched.add(_state(0, 2))
    sched.add(_state(1, 2))
    with pytest.raises(EngineOverloaded, match=r"queue is full \(4 rows waiting, bound 4; this request needs 1\)"):
        sched.add(_state(2, 1))
    assert sched.schedule(0.0).joined == ["r0", "r1"]   # admitted: the queue has room again
    sched.add(_state(2, 1))
    lone = Scheduler(max_rows=4, max_waiting_rows=1)   # an empty queue takes one request, however wide
    lone.add(_state(0, 3))
    with pytest.raises(EngineOverloaded):
        lone.add(_state(1, 1))
    with pytest.raises(ValueError, match="max_waiting_rows must be an integer >= 1 or None"):
        Scheduler(max_rows=4, max_waiting_rows=0)


def test_every_deployment_is_bounded_and_health_checked():
    """The shipped config's protective settings (deploy/serve_config.yaml says why each value)."""
    config = load_config()
    app = config["applications"][0]
    longest = app["args"]["ingress_timeout_s"]
    for d in app["deployments"]:
        assert d["max_ongoing_requests"] >= 1 and d["max_queued_requests"] >= 1, d["name"]
        assert d["health_check_period_s"] > 0 and d["health_check_timeout_s"] > 0, d["name"]
        assert d["graceful_shutdown_timeout_s"] > longest, d["name"]
        if "max_batch_rows" in d.get("user_config", {}):   # the engine's row bound binds before Serve's
            engine = IterativeConfig.from_dict(d["user_config"])
            assert d["max_ongoing_requests"] > engine.max_batch_rows + engine.max_waiting_rows, d["name"]
    ingress = next(d for d in app["deployments"] if d["name"] == "Ingress")
    assert ingress["backpressure_config"]["retry_after_s"] >= 1
    assert config["http_options"]["request_timeout_s"] > longest
    assert config["grpc_options"]["request_timeout_s"] > longest
    assert IterativeConfig().max_waiting_rows == 4 * IterativeConfig().max_batch_rows


def test_a_full_queue_in_front_of_a_model_is_503_with_retry_after():
    """Serve's BackPressureError (a model's max_queued_requests reached at the ingress's handle) and the
    engine's EngineOverloaded both answer 503 + Retry-After, gRPC RESOURCE_EXHAUSTED."""
    import asyncio

    from serving.api.ingress import Ingress
    from serving.api.jobs import GenerationJob

    class Refusing:
        def __init__(self, error):
            self.error = error

        def remote(self, job):
            async def answer():
                raise self.error
            return asyncio.ensure_future(answer())

    class Handle:
        def __init__(self, error):
            self.generate = Refusing(error)

    job = GenerationJob(class_id=1, n=1, seed=1, timeout_s=1.0)
    for error in (BackPressureError(num_queued_requests=64, max_queued_requests=64), EngineOverloaded(2, 256, 256)):
        fake = type("Fake", (), {"models": {"diffusion": Handle(error)}})()
        with pytest.raises(APIError) as e:
            asyncio.run(Ingress.func_or_class._call_replica(fake, "diffusion", job, "generate", 1.0, 1.0))
        assert (e.value.status, e.value.code, e.value.grpc_status()) == (503, "overloaded", "RESOURCE_EXHAUSTED")
        assert e.value.headers() == {"Retry-After": "1"}


# ---- the running app ---------------------------------------------------------------------------------------

def post(url: str, body: dict) -> tuple[int, dict, object, float]:
    """(status, JSON body, headers (case-insensitive), seconds) of one raw request."""
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    start = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), r.headers, time.monotonic() - start
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), err.headers, time.monotonic() - start



def grpc_infer(address: str, class_ids: list[int], parameters: dict) -> grpc.StatusCode:
    # Triton's generated messages (wire-compatible with genserve's): the pytest process has tritonclient's
    # `inference` package loaded, and the default descriptor pool refuses a second one of that name
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc.service_pb2_grpc import GRPCInferenceServiceStub

    from core.protos.parameters import set_parameter

    request = pb.ModelInferRequest(model_name="diffusion")
    t = request.inputs.add(name="class_id", datatype="INT64", shape=[len(class_ids)])
    t.contents.int64_contents.extend(class_ids)
    for key, value in parameters.items():
        set_parameter(request.parameters[key], value)
    with grpc.insecure_channel(address) as channel:
        try:
            GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
            return grpc.StatusCode.OK
        except grpc.RpcError as err:
            return err.code()


def test_a_flood_past_the_engine_bound_is_refused_at_once_and_the_server_recovers(server):
    """FLOOD clients send wide requests back to back for a few seconds: the engine takes what fits its bound,
    the rest is refused at once; meanwhile gRPC and KServe v2 HTTP are refused in their own shapes."""
    url = f"{server['url']}/v1/images/generations"
    small = {"model": "diffusion", "prompt": "bag", "steps": 6, "seed": 1}
    assert post(url, small)[0] == 200   # warm
    idle = [post(url, small)[3] for _ in range(3)]
    before = replica_metrics("diffusion")
    stop = threading.Event()

    def client(i: int) -> list:
        answers = []
        while not stop.is_set():
            answers.append(post(url, {**WIDE, "seed": i}))
        return answers

    with ThreadPoolExecutor(FLOOD) as pool:
        flood = [pool.submit(client, i) for i in range(FLOOD)]
        try:
            deadline = time.monotonic() + 30   # the queue fills within the flood's first second or two
            while replica_metrics("diffusion")["rows_queued"] + WIDE["n"] * 2 <= IterativeConfig().max_waiting_rows:
                assert time.monotonic() < deadline, replica_metrics("diffusion")
                time.sleep(0.02)
            # while it is full: gRPC's answer is RESOURCE_EXHAUSTED, KServe v2 over HTTP a 503 in its own shape
            # (16 images: one job of 32 rows; best_effort, past the policy, to reach the engine's bound)
            probe = {"steps": WIDE["steps"], "guidance_scale": 2.0, "best_effort": True}
            assert grpc_infer(server["grpc"], [1] * 16, probe) == grpc.StatusCode.RESOURCE_EXHAUSTED
            v2 = post(f"{server['url']}/v2/models/diffusion/infer",
                      {"inputs": [{"name": "class_id", "datatype": "INT64", "shape": [16], "data": [1] * 16}],
                       "parameters": probe})
            assert v2[0] == 503 and v2[2]["Retry-After"] == "1" and "queue is full" in v2[1]["error"], v2[:2]
            time.sleep(1.0)
        finally:
            stop.set()
        answers = [a for f in flood for a in f.result()]

    refused = [a for a in answers if a[0] in (429, 503)]
    served = [a for a in answers if a[0] == 200]
    assert len(served) + len(refused) == len(answers), {a[0] for a in answers}
    assert len(refused) >= FLOOD and len(served) >= 4, (len(served), len(refused))
    for status, body, headers, _ in refused:
        assert body["error"]["code"] in ("overloaded", "slo_unattainable") and "Retry-After" in headers, body
    seconds = sorted(a[3] for a in refused)
    assert statistics.median(seconds) < 1.0 and seconds[int(0.95 * len(seconds))] < 3.0, seconds   # no queueing
    print(f"flood: {len(served)} served, {len(refused)} refused ({sum(a[0] == 503 for a in refused)} x 503 by the "
          f"engine's bound) in {statistics.median(seconds) * 1000:.0f} ms median, "
          f"{seconds[int(0.95 * len(seconds))] * 1000:.0f} ms p95")
    for _, body, _, _ in served:   # the admitted ones completed, every image
        assert len(body["data"]) == WIDE["n"]
    after = replica_metrics("diffusion")
    queue_full = [a for a in refused if a[0] == 503]   # the engine's bound (the policy's refusals are 429s)
    assert queue_full and all("queue is full" in a[1]["error"]["message"] for a in queue_full)
    assert after["refused"] - before["refused"] >= len(queue_full)
    assert after["finished"] - before["finished"] >= len(served)

    # recovered: the queue is empty and a small request takes about what it took before the flood
    assert after["queue_length"] == 0
    again = [post(url, small) for _ in range(3)]
    assert all(status == 200 for status, *_ in again)
    assert np.median([a[3] for a in again]) <= 3 * np.median(idle) + 0.2, (idle, [a[3] for a in again])
    print(f"small request before / after the flood: {np.median(idle) * 1000:.0f} / "
          f"{np.median([a[3] for a in again]) * 1000:.0f} ms")
