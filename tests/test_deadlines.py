"""Deadlines end to end: a request's deadline is the tightest of its latency_slo_ms, the client's
X-Request-Timeout-Ms header, Triton's `timeout` parameter, and the ingress timeout when it sets none; the
policy admits against it, and when it passes the request leaves the step batch at the next step and its
client gets a clear timeout (504 / DEADLINE_EXCEEDED), never a late 200. A gRPC client's own deadline
cancels the work through Serve's proxy (the proxy does not pass the deadline's value on). On the session's
app (tests/conftest.py)."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from serving.api.admission import TIMEOUT_HEADER, client_timeout_s, note_client_timeout
from serving.api.errors import APIError
from tests.helpers import replica_metrics, timed_post

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's, not ours

STATUS_KEYS = ("added", "refused", "running", "queue_length", "finished", "cancelled", "expired", "failed")
SLOW = {"model": "diffusion", "prompt": "bag", "n": 2, "seed": 1, "steps": 1000}  # tens of seconds here



def idle_engine(within_s: float = 20.0) -> dict:
    """The engine's counters once nothing is in it (an earlier test's expired requests leave at their next step)."""
    deadline = time.monotonic() + within_s
    while (now := replica_metrics("diffusion"))["running"] or now["queue_length"]:
        assert time.monotonic() < deadline, {k: now[k] for k in STATUS_KEYS}
        time.sleep(0.05)
    return now


def left_the_batch(before: dict, count: int = 1, within_s: float = 10.0) -> dict:
    """Wait until the engine holds nothing and every one of the `count` requests that entered it since `before`
    left expired or cancelled, none finished (a cancellation that reaches the replica before the engine does
    leaves nothing to drop: it counts as gone)."""
    deadline = time.monotonic() + within_s
    while True:
        now = replica_metrics("diffusion")
        added = now["added"] - before["added"]
        gone = (now["expired"] + now["cancelled"]) - (before["expired"] + before["cancelled"])
        if added <= count and gone == added and now["running"] == 0 and now["queue_length"] == 0:
            assert now["finished"] == before["finished"], (before, now)
            return now
        assert time.monotonic() < deadline, ({k: before[k] for k in STATUS_KEYS}, {k: now[k] for k in STATUS_KEYS})
        time.sleep(0.05)


def test_the_header_is_parsed_from_arrival():
    note_client_timeout("250", time.monotonic() - 0.05)
    assert 0.15 < client_timeout_s() <= 0.2
    note_client_timeout("1", time.monotonic() - 10)
    assert client_timeout_s() == 0.001   # long gone: what is left is a token, and the call ends at once
    for bad in ("abc", "0", "-5", "nan", "inf", ""):
        note_client_timeout(bad, time.monotonic())
        with pytest.raises(APIError) as e:
            client_timeout_s()
        assert e.value.status == 400 and e.value.param == TIMEOUT_HEADER
    note_client_timeout(None, time.monotonic())
    assert client_timeout_s() is None


def test_a_latency_slo_is_a_504_at_the_deadline_and_the_request_leaves_the_batch(server):
    url = f"{server['url']}/v1/images/generations"
    assert timed_post(url, {"model": "diffusion", "prompt": "bag", "steps": 2})[0] == 200   # a warm engine
    before = idle_engine()
    status, body, seconds = timed_post(url, {**SLOW, "latency_slo_ms": 400, "best_effort": True})
    assert status == 504 and body["error"]["code"] == "deadline_exceeded", body
    assert 0.35 < seconds < 1.5, seconds
    left_the_batch(before)
    print(f"latency_slo_ms 400: 504 after {seconds * 1000:.0f} ms")


def test_time_spent_before_the_ingress_is_spent_from_the_slo(server):
    """X-Request-Start (a load balancer's, or the client's, send time): the budget counts from then. A request
    that spent its whole SLO queued in front of the ingress is refused at once; the same request sent now is
    served; and without the header the policy plans from the ingress's clock, as before."""
    url = f"{server['url']}/v1/images/generations"
    body = {"model": "gan", "prompt": "bag", "latency_slo_ms": 1500}
    status, answer, _ = timed_post(url, body, {"X-Request-Start": f"t={time.time() - 1.49:.3f}"})
    assert status == 429 and answer["error"]["code"] == "slo_unattainable", answer
    assert timed_post(url, body, {"X-Request-Start": f"t={time.time():.3f}"})[0] == 200
    status, answer, _ = timed_post(url, body)
    assert status == 200 and answer["policy"]["slo_ms"] == 1500 - 20  # the edge kept for the way out


def test_the_request_timeout_header_is_the_deadline(server):
    """X-Request-Timeout-Ms: admission plans for it (a request predicted to miss it is a 429 at once), the
    engine drops the request at it (504), and a request that fits gets its 200."""
    url = f"{server['url']}/v1/images/generations"
    status, body, seconds = timed_post(url, SLOW, {TIMEOUT_HEADER: "400"})
    assert status == 429 and body["error"]["code"] == "slo_unattainable" and seconds < 1.0, body
    before = idle_engine()
    status, body, seconds = timed_post(url, {**SLOW, "best_effort": True}, {TIMEOUT_HEADER: "400"})
    assert status == 504 and body["error"]["code"] == "deadline_exceeded" and 0.35 < seconds < 1.5, (body, seconds)
    left_the_batch(before)
    # the tighter of the header and latency_slo_ms holds
    status, body, seconds = timed_post(url, {**SLOW, "best_effort": True, "latency_slo_ms": 300}, {TIMEOUT_HEADER: "60000"})
    assert status == 504 and seconds < 1.2, (body, seconds)
    status, body, _ = timed_post(url, {"model": "gan", "prompt": "bag", "seed": 1}, {TIMEOUT_HEADER: "5000"})
    assert status == 200 and body["policy"]["slo_ms"] <= 5000, body
    status, body, _ = timed_post(url, {"model": "gan", "prompt": "bag"}, {TIMEOUT_HEADER: "soon"})
    assert status == 400 and body["error"]["param"] == TIMEOUT_HEADER, body
    # KServe v2 over HTTP reads the header too, and Triton's timeout parameter (microseconds)
    v2 = f"{server['url']}/v2/models/diffusion/infer"
    tensor = {"name": "class_id", "datatype": "INT64", "shape": [1], "data": [1]}
    for headers, parameters in (({TIMEOUT_HEADER: "300"}, {}), ({}, {"timeout": 300_000})):
        status, body, seconds = timed_post(v2, {"inputs": [tensor], "parameters": {"steps": 1000, "best_effort": True,
                                                                          **parameters}}, headers)
        assert status == 504 and "error" in body and seconds < 1.2, (body, seconds)


def test_never_a_late_200(server):
    """Requests whose work takes about their SLO: each is a 200 within it or a 504 at it, never a 200 after it
    (at the ingress's clock; the client's adds the proxy hops, a few ms here)."""
    url = f"{server['url']}/v1/images/generations"
    slo_ms = 600
    bodies = [{"model": "diffusion", "prompt": "shirt", "seed": i, "n": 4, "steps": steps, "latency_slo_ms": slo_ms,
               "best_effort": True} for i, steps in enumerate((5, 10, 20, 40, 60, 80, 120, 160) * 2)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: timed_post(url, b), bodies))
    assert {a[0] for a in answers} <= {200, 504}, [a[1] for a in answers if a[0] not in (200, 504)]
    assert any(a[0] == 504 for a in answers), "the slowest should have missed: make them slower"
    print(f"near the SLO: {sum(a[0] == 200 for a in answers)} x 200 (slowest "
          f"{max((a[2] for a in answers if a[0] == 200), default=0) * 1000:.0f} ms), {sum(a[0] == 504 for a in answers)} x 504 "
          f"(latest {max((a[2] for a in answers if a[0] == 504), default=0) * 1000:.0f} ms)")
    for status, body, seconds in answers:
        if status == 200:
            assert body["policy"]["actual_ms"] <= slo_ms + 5 and seconds * 1000 <= slo_ms + 150, (body["policy"], seconds)
        else:
            assert body["error"]["code"] == "deadline_exceeded" and seconds * 1000 <= slo_ms + 500, (body, seconds)


def test_a_grpc_deadline_cancels_the_work(server):
    """Three clients whose gRPC deadline (1 s) passes mid-generation: each gets DEADLINE_EXCEEDED from its own
    library, and the proxy's cancellation reaches the engine, which drops all three at the next step."""
    # Triton's generated messages (wire-compatible with genserve's): the pytest process has tritonclient's
    # `inference` package loaded, and the default descriptor pool refuses a second one of that name
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc.service_pb2_grpc import GRPCInferenceServiceStub

    from core.protos.parameters import set_parameter

    def call(seed: int) -> grpc.StatusCode:
        request = pb.ModelInferRequest(model_name="diffusion")
        t = request.inputs.add(name="class_id", datatype="INT64", shape=[1])
        t.contents.int64_contents.append(1)
        s = request.inputs.add(name="seed", datatype="INT64", shape=[1])
        s.contents.int64_contents.append(seed)
        set_parameter(request.parameters["steps"], 1000)
        set_parameter(request.parameters["best_effort"], True)  # admitted past the default SLO: the client's deadline cuts it
        with grpc.insecure_channel(server["grpc"]) as channel:
            try:
                GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=1.0)
                return grpc.StatusCode.OK
            except grpc.RpcError as err:
                return err.code()

    before = idle_engine()
    with ThreadPoolExecutor(3) as pool:
        codes = list(pool.map(call, range(3)))
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 3
    left_the_batch(before, count=3, within_s=20)


def test_a_grpc_timeout_in_the_metadata_is_the_deadline(server):
    """X-Request-Timeout-Ms as gRPC metadata: admission plans for it (a request predicted to miss it is
    RESOURCE_EXHAUSTED at once) and, best effort, the engine drops it at the deadline: DEADLINE_EXCEEDED from
    the server, with the client's own deadline far away."""
    # Triton's generated messages (wire-compatible with genserve's): the pytest process has tritonclient's
    # `inference` package loaded, and the default descriptor pool refuses a second one of that name
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc.service_pb2_grpc import GRPCInferenceServiceStub

    from core.protos.parameters import set_parameter

    request = pb.ModelInferRequest(model_name="diffusion")
    t = request.inputs.add(name="class_id", datatype="INT64", shape=[1])
    t.contents.int64_contents.append(1)
    set_parameter(request.parameters["steps"], 1000)
    metadata = ((TIMEOUT_HEADER.lower(), "400"),)
    with grpc.insecure_channel(server["grpc"]) as channel:
        stub = GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request, timeout=60, metadata=metadata)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
        set_parameter(request.parameters["best_effort"], True)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as late:
            stub.ModelInfer(request, timeout=60, metadata=metadata)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - start < 2.0


@pytest.mark.parametrize("value, spent", [
    ("t=1799999999.5", 0.5), ("1799999999.5", 0.5), ("t=1799999999500", 0.5), ("t=1799999999500000", 0.5),  # s, ms, us
    (None, 0.0), ("", 0.0), ("t=soon", 0.0), ("t=1800000000.5", 0.0), ("t=1799999000", 0.0),  # absent, garbage, future, stale
])
def test_x_request_start_is_read_in_seconds_ms_or_us_and_an_untrustworthy_clock_is_ignored(value, spent):
    from serving.api.admission import note_request_start, spent_before_ingress_s

    note_request_start(value, 1_800_000_000.0)
    assert spent_before_ingress_s() == pytest.approx(spent)
