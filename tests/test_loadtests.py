"""The load generator and its reports (loadtests/), against a small aiohttp stub server in a thread: no Ray.
The acceptance tests are the open loop's timing (a slow or stalled server does not slow the sends: no
coordinated omission) and the report of a recorded run opening in headless Chromium with its plots."""
from __future__ import annotations

import asyncio
import csv
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web

from loadtests.clients import kserve_body, openai_body
from loadtests.records import REQUESTS, REQUESTS_CSV, RUN, Record, load_run
from loadtests.report import write_report
from loadtests.runner import run_scenario
from loadtests.scenario import Scenario, Template, load_scenario
from loadtests.schedule import Window, open_loop_schedule
from loadtests.stats import summarize
from tests.browser import open_page
from tests.helpers import run_cli

SCENARIOS = Path(__file__).resolve().parents[1] / "loadtests" / "scenarios"


# --- a stub server ------------------------------------------------------------------------------------------

class StubServer:
    """genserve's OpenAI and KServe v2 answers in shape, each after `delay_s`; model "busy" is always rejected
    (429). Records when each request arrived (time.monotonic, the runner's clock) and the peak in flight."""

    def __init__(self):
        self.delay_s = 0.0
        self.arrivals: list[float] = []
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        app = web.Application()
        app.add_routes([web.get("/v1/models", self.models), web.post("/v1/images/generations", self.openai),
                        web.get("/v2", self.server_meta), web.post("/v2/models/{model}/infer", self.kserve),
                        web.get("/metrics", self.metrics)])
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._call(self._start())

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _start(self):
        await self.runner.setup()
        await web.SockSite(self.runner, self.sock).start()

    def close(self):
        self._call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    async def _stop(self):
        await self.runner.cleanup()
        handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]  # e.g. stalled ones
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    async def _serve(self, body: dict) -> None:
        self.arrivals.append(time.monotonic())
        self.bodies.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{"id": "gan", "family": "gan", "version": "v1"}]})

    async def openai(self, request):
        body = await request.json()
        await self._serve(body)
        if body["model"] == "busy":
            return web.json_response({"error": {"message": "over capacity"}}, status=429, headers={"Retry-After": "1"})
        model = "diffusion" if body.get("steps") else "gan"
        settings = {"sampler": body.get("sampler", "ddim"), "steps": body["steps"]} if body.get("steps") else {}
        return web.json_response({"data": [{"b64_json": "AA=="}] * body["n"], "model": model, "family": model,
                                  "version": "v1", "settings": settings, "latency_ms": 1.0})

    async def server_meta(self, request):
        return web.json_response({"name": "stub", "version": "0", "extensions": []})

    async def kserve(self, request):
        body = await request.json()
        await self._serve(body)
        n = body["inputs"][0]["shape"][0]
        return web.json_response({"model_name": request.match_info["model"], "model_version": "v1",
                                  "parameters": {"family": "gan", "settings": {}},
                                  "outputs": [{"name": "image", "datatype": "UINT8", "shape": [n, 28, 28],
                                               "data": [0] * (n * 784)}]})

    async def metrics(self, request):
        occupancy = min(1.0, self.in_flight / 4)
        return web.Response(text="# TYPE ray_genserve_engine_batch_occupancy gauge\n"
                                 f'ray_genserve_engine_batch_occupancy{{deployment="diffusion"}} {occupancy}\n'
                                 "# TYPE ray_other gauge\nray_other 1\n")


@pytest.fixture
def stub():
    server = StubServer()
    yield server
    server.close()


def scenario(url: str | None, load: dict, **overrides) -> Scenario:
    data = {"name": "t", "load": load, "mix": [{"model": "gan", "prompt": "sneaker"}]} | overrides
    return Scenario.from_dict(data | ({"url": url} if url else {}))


# --- scenarios ----------------------------------------------------------------------------------------------

OPEN = {"arrival": "constant", "stages": [{"rate": 2, "duration_s": 1}]}


@pytest.mark.parametrize("change, message", [
    ({"duration": 3}, "unknown key 'duration'; expected name, mix, load"),
    ({"mix": [{"model": "gan"}, {"model": "gan", "n": 0}]}, "mix[1]: n must be an integer >= 1, got 0"),
    ({"mix": [{"modle": "gan"}]}, "mix[0]: unknown key 'modle'"),
    ({"mix": [{"quality": "great"}]}, "mix[0]: quality must be one of draft, standard, best, got 'great'"),
    ({"mix": []}, "mix must list at least one request template"),
    ({"load": {"arrival": "poisson", "stages": [{"rat": 2, "duration_s": 1}]}}, "load.stages[0]: unknown key 'rat'"),
    ({"load": {"arrival": "bursty", "stages": [{"rate": 2, "duration_s": 1}]}}, "arrival must be one of poisson"),
    ({"load": {"arrival": "poisson", "ramp": {"from": 1, "to": 4, "steps": 1, "stage_s": 5}}}, "steps must be an integer >= 2"),
    ({"load": {"arrival": "poisson"}}, "give exactly one of stages or ramp"),
    ({"load": {"concurrency": 0, "duration_s": 5}}, "load: concurrency must be an integer >= 1, got 0"),
    ({"load": {"concurrency": 2}}, "load: missing 'duration_s'"),
    ({"protocol": "kserve_grpc", "url": "http://127.0.0.1:9000"}, "url must start with grpc:// for protocol kserve_grpc"),
    ({"protocol": "kserve_http"}, "mix[0]: KServe v2 takes class_id"),
    ({"url": "localhost:8000"}, "url must start with http:// or https://"),
    ({"max_requests": 0}, "max_requests must be an integer >= 1"),
])
def test_scenario_errors_name_the_field(change, message):
    data = {"name": "t", "load": OPEN, "mix": [{"model": "gan", "prompt": "sneaker"}]} | change
    with pytest.raises(ValueError, match="^scenario <dict>: ") as err:
        Scenario.from_dict(data)
    assert message in str(err.value)


def test_scenario_yaml_ramp_and_examples(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: r\nload: {arrival: poisson, ramp: {from: 2, to: 8, steps: 4, stage_s: 5}}\n"
                    "mix: [{model: diffusion, steps: 10, latency_slo_ms: 500}]\n")
    s = load_scenario(path)
    assert [st.rate for st in s.load.stages] == [2, 4, 6, 8] and s.duration_s == 20
    assert openai_body(s.mix[0], 7) == {"model": "diffusion", "n": 1, "seed": 7, "steps": 10, "latency_slo_ms": 500}
    path.write_text("name: [")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_scenario(path)
    examples = sorted(SCENARIOS.glob("*.yaml"))
    assert {p.stem for p in examples} >= {"smoke", "diffusion_ramp", "auto_slo_mix"}
    for p in examples:
        load_scenario(p)


def test_default_url_follows_the_protocol():
    mix = [{"model": "gan", "class_id": 1}]
    assert scenario(None, OPEN, mix=mix).url == "http://127.0.0.1:8000"
    assert scenario(None, OPEN, mix=mix, protocol="kserve_grpc").url == "grpc://127.0.0.1:9000"


def test_kserve_body():
    body = kserve_body(Template(model="gan", class_id=3, n=2, steps=5, quality="best"), 10)
    assert body["inputs"] == [{"name": "class_id", "shape": [2], "datatype": "INT64", "data": [3, 3]},
                              {"name": "seed", "shape": [2], "datatype": "INT64", "data": [10, 11]}]
    assert body["parameters"] == {"steps": 5, "quality": "best"}


# --- the schedule -------------------------------------------------------------------------------------------

def test_schedule_is_deterministic_and_keeps_the_mix():
    mix = [{"model": "gan", "weight": 3}, {"model": "vae", "weight": 1}]
    make = lambda seed: scenario("http://x", {"arrival": "poisson", "stages": [{"rate": 50, "duration_s": 40}]},
                                 mix=mix, seed=seed)
    a, b, c = open_loop_schedule(make(1)), open_loop_schedule(make(1)), open_loop_schedule(make(2))
    assert a == b and a != c
    share = np.mean([s.template == 0 for s in a])
    assert abs(share - 0.75) < 4 * np.sqrt(0.75 * 0.25 / len(a))
    assert len({s.seed for s in a}) == len(a)


def test_constant_and_poisson_rates():
    const = open_loop_schedule(scenario("http://x", {"arrival": "constant", "stages": [
        {"rate": 4, "duration_s": 2}, {"rate": 10, "duration_s": 1}]}, warmup_s=1))
    assert [s.at for s in const] == pytest.approx([i / 4 for i in range(4)] + [1 + i / 4 for i in range(8)]
                                                  + [3 + i / 10 for i in range(10)])
    assert [s.warmup for s in const] == [True] * 4 + [False] * 18
    assert [s.stage for s in const] == [0] * 12 + [1] * 10

    rate, duration = 100, 100
    sends = open_loop_schedule(scenario("http://x", {"arrival": "poisson", "stages": [
        {"rate": rate, "duration_s": duration}]}))
    expected = rate * duration
    assert abs(len(sends) - expected) < 4 * np.sqrt(expected)     # Poisson count: sd = sqrt(mean)
    gaps = np.diff([s.at for s in sends])
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # exponential gaps: CV = 1
    assert len(open_loop_schedule(scenario("http://x", {"arrival": "poisson", "stages": [
        {"rate": rate, "duration_s": duration}]}, max_requests=17))) == 17


# --- the runner ---------------------------------------------------------------------------------------------

def test_open_loop_keeps_its_schedule_when_the_server_is_slow(stub, tmp_path):
    """20 req/s against a server taking 0.5 s each: a closed loop would wait; the open loop sends on time."""
    stub.delay_s = 0.5
    sc = scenario(stub.url, {"arrival": "constant", "stages": [{"rate": 20, "duration_s": 2}]})
    records = load_run(run_scenario(sc, tmp_path, progress=False, command="test")).records
    assert len(records) == 40 and all(r.ok for r in records)
    assert [r.intended_send for r in records] == pytest.approx([i / 20 for i in range(40)])
    # A generator that waited for answers would fall 0.5 s further behind with every request it held back;
    # the bounds leave room for a busy 2-core machine stalling the event loop now and then.
    lags = np.array([r.actual_send - r.intended_send for r in records])
    assert np.median(lags) < 0.02 and np.percentile(lags, 90) < 0.1 and lags.max() < 0.25, lags
    assert all(0.5 <= r.latency_s < 0.9 for r in records)      # from the intended send: lag included
    arrivals = np.array(stub.arrivals) - stub.arrivals[0]         # the server's view
    assert arrivals == pytest.approx([i / 20 for i in range(40)], abs=0.25)
    assert stub.max_in_flight >= 9                                 # ~ rate x service time were waiting at once


def test_open_loop_through_a_stalled_server_records_timeouts(stub, tmp_path):
    stub.delay_s = 60
    sc = scenario(stub.url, {"arrival": "constant", "stages": [{"rate": 10, "duration_s": 1}]}, request_timeout_s=0.4)
    started = time.monotonic()
    records = load_run(run_scenario(sc, tmp_path, progress=False)).records
    assert time.monotonic() - started < 3                          # bounded: duration + timeout
    assert len(records) == len(stub.arrivals) == 10
    assert all(r.status == 0 and r.timed_out and r.error.startswith("timeout") for r in records)
    assert all(0.4 <= r.latency_s < 0.8 for r in records)
    assert np.array(stub.arrivals) - stub.arrivals[0] == pytest.approx([i / 10 for i in range(10)], abs=0.25)


def test_closed_loop_keeps_its_concurrency(stub, tmp_path):
    stub.delay_s = 0.1
    sc = scenario(stub.url, {"concurrency": 3, "duration_s": 1})
    records = load_run(run_scenario(sc, tmp_path / "a", progress=False)).records
    assert stub.max_in_flight == 3
    assert 18 <= len(records) <= 33                               # 3 users x ~10 answers per second
    assert [r.id for r in records] == list(range(len(records))) and all(r.offered_rate is None for r in records)
    records = load_run(run_scenario(scenario(stub.url, {"concurrency": 3, "duration_s": 5}, max_requests=4),
                                    tmp_path / "b", progress=False)).records
    assert len(records) == 4


def test_records_and_run_metadata(stub, tmp_path):
    mix = [{"model": "gan", "prompt": "bag", "n": 2}, {"model": "busy", "latency_slo_ms": 100}]
    sc = scenario(stub.url, {"arrival": "constant", "stages": [{"rate": 20, "duration_s": 0.5}]}, mix=mix,
                  warmup_s=0.2, seed=3)
    run = load_run(run_scenario(sc, tmp_path, progress=False, command="genserve loadtest x.yaml"))
    lines = (tmp_path / REQUESTS).read_text().splitlines()
    csv_lines = (tmp_path / REQUESTS_CSV).read_text().splitlines()
    assert len(lines) == len(run.records) == len(csv_lines) - 1 == 14
    assert csv_lines[0].startswith("id,stage,offered_rate,template,requested_model")
    assert sum(r.warmup for r in run.records) == 4
    for r in run.records:
        sent = stub.bodies[[b["seed"] for b in stub.bodies].index(r.seed)]
        if r.requested_model == "busy":
            assert (r.status, r.ok, r.rejected, r.slo_ms) == (429, False, True, 100)
            assert r.error == "HTTP 429: over capacity (Retry-After: 1)"
            assert sent == {"model": "busy", "n": 1, "seed": r.seed, "latency_slo_ms": 100}
        else:
            assert (r.status, r.ok, r.model, r.family, r.server_ms) == (200, True, "gan", "gan", 1.0)
            assert sent == {"model": "gan", "n": 2, "seed": r.seed, "prompt": "bag"} and r.bytes > 0
    meta = json.loads((tmp_path / RUN).read_text())
    assert meta["command"] == "genserve loadtest x.yaml" and meta["complete"] is True
    assert meta["server"]["data"][0]["id"] == "gan" and meta["scenario"]["seed"] == 3
    assert meta["environment"]["cpu_count"] >= 1 and "python" in meta["environment"]
    assert run.windows == [Window(0, 0.2, 0.7, 20)]


def test_kserve_http_client(stub, tmp_path):
    sc = scenario(stub.url, {"arrival": "constant", "stages": [{"rate": 10, "duration_s": 0.3}]},
                  protocol="kserve_http", mix=[{"model": "gan", "class_id": 4, "n": 2, "steps": 3}])
    run = load_run(run_scenario(sc, tmp_path, progress=False))
    assert len(run.records) == 3 and all(r.ok and r.model == "gan" for r in run.records)
    assert run.meta["server"]["name"] == "stub"
    assert stub.bodies[0]["inputs"][0]["data"] == [4, 4] and stub.bodies[0]["parameters"] == {"steps": 3}


# Run in a child process: genserve's generated `inference` messages cannot load into a process that has
# loaded tritonclient's (other test modules use it), and the client imports them.
GRPC_RUN = """
import json, sys
from concurrent import futures
import grpc
from core.protos import open_inference_pb2 as pb, open_inference_pb2_grpc as pb_grpc
from loadtests.records import load_run
from loadtests.runner import run_scenario
from loadtests.scenario import Scenario

received = []

class Stub(pb_grpc.GRPCInferenceServiceServicer):
    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="stub", version="0")

    def ModelInfer(self, request, context):
        received.append({"model": request.model_name, "class_id": list(request.inputs[0].contents.int64_contents),
                         "seed": list(request.inputs[1].contents.int64_contents),
                         "steps": request.parameters["steps"].int64_param})
        if request.model_name == "busy":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "over capacity")
        n = request.inputs[0].shape[0]
        response = pb.ModelInferResponse(model_name="diffusion", model_version="v1")
        response.parameters["family"].string_param = "diffusion"
        response.parameters["steps"].int64_param = request.parameters["steps"].int64_param
        response.outputs.add(name="image", datatype="UINT8", shape=[n, 28, 28])
        response.raw_output_contents.append(bytes(n * 784))
        return response

server = grpc.server(futures.ThreadPoolExecutor(4))
pb_grpc.add_GRPCInferenceServiceServicer_to_server(Stub(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
sc = Scenario.from_dict({"name": "g", "protocol": "kserve_grpc", "url": f"grpc://127.0.0.1:{port}",
                         "load": {"arrival": "constant", "stages": [{"rate": 10, "duration_s": 0.4}]},
                         "mix": [{"model": "diffusion", "class_id": 4, "n": 2, "steps": 7}, {"model": "busy", "class_id": 1}]})
run = load_run(run_scenario(sc, sys.argv[1], progress=False))
server.stop(0)
print(json.dumps({"server": run.meta["server"], "received": received,
                  "records": [[r.requested_model, r.status, r.ok, r.model, r.family, r.settings, r.error, r.seed]
                              for r in run.records]}))
"""


def test_kserve_grpc_client(tmp_path):
    done = subprocess.run([sys.executable, "-c", GRPC_RUN, str(tmp_path)], capture_output=True, text=True,
                          timeout=60, cwd=SCENARIOS.parents[1])
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["server"] == {"name": "stub", "version": "0"}
    assert len(out["records"]) == len(out["received"]) == 4
    for (model, status, ok, served, family, settings, error, seed) in out["records"]:
        sent = next(r for r in out["received"] if r["seed"][0] == seed)
        if model == "busy":
            assert (status, ok, error) == (429, False, "gRPC RESOURCE_EXHAUSTED: over capacity")
            assert sent == {"model": "busy", "class_id": [1], "seed": [seed], "steps": 0}
        else:
            assert (status, ok, served, family, settings, error) == (200, True, "diffusion", "diffusion", {"steps": 7}, None)
            assert sent == {"model": "diffusion", "class_id": [4, 4], "seed": [seed, seed + 1], "steps": 7}


def test_unreachable_server_fails_before_sending(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"    # bound, not listening: refused
        with pytest.raises(RuntimeError, match="cannot reach the server: GET .*/v1/models"):
            run_scenario(scenario(url, OPEN), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# --- stats --------------------------------------------------------------------------------------------------

def record(i: int, latency: float, status: int = 200, model: str = "gan", warmup: bool = False,
           steps: int | None = None, slo_ms: float | None = None) -> Record:
    return Record(id=i, stage=0, offered_rate=11.0, template=0, requested_model="auto", slo_ms=slo_ms, seed=i,
                  intended_send=i * 0.08, actual_send=i * 0.08 + 0.001, latency_s=latency, status=status,
                  ok=status == 200, model=model if status == 200 else None, family=None,
                  settings={"steps": steps} if steps else {}, policy=None, server_ms=None, bytes=0, error=None,
                  warmup=warmup)


def test_summarize_synthetic_records():
    ok = [record(i, (i + 1) / 100, model="gan" if i % 2 else "vae", steps=10 if i < 20 else None, slo_ms=500)
          for i in range(100)]                                      # latencies 0.01 .. 1.00 s
    rejected = [record(100 + i, 0.002, status=429, slo_ms=500) for i in range(10)]
    warm = [record(200 + i, 5.0, warmup=True) for i in range(5)]
    summary = summarize(ok + rejected + warm, [Window(0, 0.0, 10.0, 11.0)])
    all_ = summary.overall
    assert all_.requests == 110 and all_.ok == 100 and all_.window_s == 10.0
    assert (all_.p50_s, all_.p90_s, all_.p99_s) == pytest.approx((0.505, 0.901, 0.9901))
    assert all_.throughput_rps == pytest.approx(10.0)
    assert all_.goodput_rps == pytest.approx(5.0)                   # the 50 within 500 ms
    assert all_.slo_attainment == pytest.approx(50 / 110)
    assert all_.rejection_rate == all_.error_rate == pytest.approx(10 / 110)
    assert all_.send_lag_p99_s == pytest.approx(0.001)
    assert summary.by_stage[0].offered_rps == 11.0
    assert {g.key: g.requests for g in summary.by_model} == {"auto": 10, "gan": 50, "vae": 50}
    assert [(g.key, g.requests) for g in summary.by_steps] == [("steps=10", 20)]
    strict = summarize(ok, [Window(0, 0.0, 10.0, 11.0)], slo_ms=100).overall
    assert strict.goodput_rps == pytest.approx(1.0) and strict.slo_attainment == pytest.approx(0.1)


def test_throughput_window_stretches_to_the_last_answer():
    late = [record(i, 10.0) for i in range(10)]                     # sent over 0.72 s, answered 10 s later
    stats = summarize(late, [Window(0, 0.0, 1.0, 10.0)]).overall
    assert stats.window_s == pytest.approx(10.72) and stats.throughput_rps == pytest.approx(10 / 10.72)


# --- the CLI and the report ---------------------------------------------------------------------------------

@pytest.fixture
def recorded_run(stub, tmp_path, capsys) -> tuple[Path, str]:
    """A two-stage run through `genserve loadtest`, with SLOs, rejections, step counts and scraped metrics:
    the run directory and what the command printed."""
    stub.delay_s = 0.05
    path = tmp_path / "scenario.yaml"
    path.write_text(f"""
name: report-test
load: {{arrival: poisson, stages: [{{rate: 10, duration_s: 1}}, {{rate: 30, duration_s: 1.2}}]}}
warmup_s: 0.3
metrics_url: {stub.url}/metrics
mix:
  - {{weight: 2, model: gan, prompt: sneaker, latency_slo_ms: 60}}
  - {{model: diffusion, steps: 10, sampler: dpmpp_2m, latency_slo_ms: 500}}
  - {{model: diffusion, steps: 25}}
  - {{model: busy}}
""")
    run_cli("loadtest", str(path), "--url", stub.url, "--out", str(tmp_path / "run"), "--no-progress")
    return tmp_path / "run", capsys.readouterr().out


def test_report_of_a_recorded_run_opens_in_chromium(recorded_run):
    recorded_run, printed = recorded_run
    assert "| stage 1 |" in printed and "| all |" in printed        # the CLI's one-screen summary
    run_cli("report", str(recorded_run))
    html, md = recorded_run / "report.html", recorded_run / "report.md"
    text = md.read_text()
    assert "--no-progress" in text.splitlines()[3]                  # the exact command, first
    for heading in ("## Per stage", "## Per served model", "## Per step count", "## What served the requests"):
        assert heading in text
    assert "rejected (429)" in text and "diffusion dpmpp_2m 10" in text
    page_text = html.read_text()
    assert "<script" not in page_text and "<link" not in page_text   # self-contained: nothing to fetch
    with open_page(html, allow_hosts=()) as loaded:
        assert loaded.problems == []
        sizes = loaded.page.eval_on_selector_all(
            "img.plot", "imgs => imgs.map(i => [i.alt, i.complete && i.naturalWidth, i.naturalHeight])")
        assert [alt for alt, *_ in sizes] == ["Latency CDF per model", "Latency and throughput vs offered load",
                                              "SLO attainment per stage", "Rejections per stage",
                                              "Policy choices over time", "Batch occupancy"]
        assert all(w > 100 and h > 100 for _, w, h in sizes), sizes
        assert loaded.page.locator(".missing").count() == 0
        assert "stage 1" in loaded.page.inner_text("body")


def test_report_says_what_it_lacks(stub, tmp_path):
    sc = scenario(stub.url, {"arrival": "constant", "stages": [{"rate": 10, "duration_s": 0.3}]})
    html, _ = write_report(run_scenario(sc, tmp_path, progress=False))
    text = html.read_text()
    assert "no metrics scraped" in text and "no request had a latency SLO" in text


def test_locustfile_runs_against_the_stub(stub, tmp_path):
    """Locust itself runs the locustfile headless for 3 s against the stub: its users post the scenario's mix
    to the OpenAI route, the stub sees those requests and Locust counts them, none failed."""
    scenario = load_scenario(SCENARIOS / "smoke.yaml")
    command = [sys.executable, "-m", "locust", "-f", str(SCENARIOS.parent / "locustfile.py"), "--headless",
               "-u", "2", "-r", "2", "-t", "3s", "--host", stub.url, "--csv", str(tmp_path / "locust"),
               "--only-summary", "--loglevel", "WARNING"]
    run = subprocess.run(command, cwd=SCENARIOS.parents[1], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "GENSERVE_SCENARIO": str(SCENARIOS / "smoke.yaml")})
    assert run.returncode == 0, run.stderr[-3000:]   # Locust exits 1 when any request failed
    with open(tmp_path / "locust_stats.csv") as f:
        stats = {row["Name"]: row for row in csv.DictReader(f)}
    sent, failed = int(stats["Aggregated"]["Request Count"]), int(stats["Aggregated"]["Failure Count"])
    assert sent >= 10 and failed == 0, stats["Aggregated"]
    assert set(stats) - {"Aggregated"} == {f"{t.model} n={t.n}" for t in scenario.mix}   # both templates ran
    assert len(stub.bodies) >= sent   # (a request in flight when the run stopped reached the stub, uncounted)
    assert {(b["model"], b["n"], b["prompt"]) for b in stub.bodies} == {(t.model, t.n, t.prompt) for t in scenario.mix}
