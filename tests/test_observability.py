"""genserve's metrics (serving/observability/), its Grafana dashboard and its Prometheus alert rules.

The metric definitions are checked against Prometheus' naming conventions; the alert rules with Debian's
`promtool` (syntax, and unit tests of when each alert fires); and the whole pipeline with a real Prometheus
(Debian's `prometheus`, installed by scripts/setup.sh --test) scraping the session's app on Ray's metrics
port: the counts it reports must match, exactly, the requests this module sends; every dashboard and rule
expression must evaluate there."""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest
import yaml

from serving.observability import METRICS, observe_request
from serving.observability.http import protocol_of
from serving.observability.metrics import COUNTER, GAUGE, HISTOGRAM, LATENCY_BUCKETS_S, REPLICA_RETRIES, CASCADE_IMAGES
from serving.onepass.batcher import ImageBatcher
from serving.config import OnePassConfig
from tests.helpers import METRICS_EXPORT_MS, free_port

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy/grafana/genserve-dashboard.json"
ALERTS = ROOT / "deploy/prometheus/alerts.yaml"
PROMETHEUS_DIR = ROOT / "deploy/prometheus"

# Ray Serve's own metrics the dashboard and alerts read (the live test checks they exist)
SERVE_BUILTINS = {"ray_serve_deployment_replica_healthy", "ray_serve_deployment_status"}


def binary(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} not found: install Debian's prometheus package (scripts/setup.sh --test does)"
    return path


def defined_series() -> set[str]:
    """Every series name genserve's metrics appear under in Prometheus."""
    names = set()
    for m in METRICS:
        names |= {f"{m.series}_{s}" for s in ("bucket", "sum", "count")} if m.kind == HISTOGRAM else {m.series}
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (genserve's and Ray's all start with ray_)."""
    return set(re.findall(r"\bray_[a-zA-Z0-9_]+", expr))


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]


def rule_exprs() -> list[tuple[str, str]]:
    """(alert or record name, PromQL) for every rule in alerts.yaml."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [(r.get("alert") or r["record"], r["expr"]) for g in groups for r in g["rules"]]


# ---- definitions, dashboard and rules: no server ---------------------------------------------------------

def test_metric_definitions_follow_prometheus_conventions():
    names = [m.name for m in METRICS]
    assert len(set(names)) == len(names)
    for m in METRICS:
        assert re.fullmatch(r"genserve_[a-z_]+", m.name) and m.description, m
        assert m.kind in (COUNTER, GAUGE, HISTOGRAM), m
        assert m.name.endswith("_total") == (m.kind == COUNTER), f"{m.name}: only counters end in _total"
        assert m.ray_name == m.name.removesuffix("_total")  # Ray's exporter appends _total to counters itself
        assert all(re.fullmatch(r"[a-z_]+", label) for label in m.labels), m
        assert not {"deployment", "replica", "application", "le"} & set(m.labels), f"{m.name}: label reserved by Serve"
        assert bool(m.buckets) == (m.kind == HISTOGRAM), m
        assert list(m.buckets) == sorted(set(m.buckets)) and all(b > 0 for b in m.buckets), m
        if "duration" in m.name:
            assert m.name.endswith("_seconds") and m.kind == HISTOGRAM, f"{m.name}: durations are seconds histograms"
    assert LATENCY_BUCKETS_S[0] == 0.001 and LATENCY_BUCKETS_S[-1] == 60.0
    kinds = {m.series: m.kind for m in METRICS}
    assert kinds == {
        "ray_genserve_request_duration_seconds": HISTOGRAM, "ray_genserve_queue_duration_seconds": HISTOGRAM,
        "ray_genserve_compute_duration_seconds": HISTOGRAM, "ray_genserve_images_served_total": COUNTER,
        "ray_genserve_batch_size_images": HISTOGRAM, "ray_genserve_engine_batch_occupancy_ratio": GAUGE,
        "ray_genserve_engine_running_requests": GAUGE, "ray_genserve_engine_waiting_requests": GAUGE,
        "ray_genserve_engine_steps_per_second": GAUGE, "ray_genserve_engine_steps_total": COUNTER,
        "ray_genserve_policy_decisions_total": COUNTER, "ray_genserve_slo_requests_total": COUNTER,
        "ray_genserve_cascade_images_total": COUNTER,
        "ray_genserve_rejections_total": COUNTER, "ray_genserve_model_load_duration_seconds": HISTOGRAM,
        "ray_genserve_store_verification_failures_total": COUNTER, "ray_genserve_replica_retries_total": COUNTER,
        "ray_genserve_model_ready": GAUGE}


def test_protocol_labels():
    assert protocol_of("/v1/images/generations") == "openai"
    assert protocol_of("/v2/models/gan/infer") == "kserve"
    assert protocol_of("/playground") == "http"


def test_batcher_reports_queue_and_compute_time_per_request():
    """A request spanning two batches is reported once, when its last images are back."""
    times = []

    async def forward(feeds):
        await asyncio.sleep(0.01)
        return feeds["x"]

    async def main():
        b = ImageBatcher(forward, OnePassConfig(max_batch_images=2, max_wait_ms=0),
                         on_job_done=lambda q, c: times.append((q, c)))
        out = await asyncio.gather(b.submit({"x": np.arange(3)}), b.submit({"x": np.arange(1)}))
        await b.close()
        return out

    asyncio.run(main())
    assert len(times) == 2
    (q3, c3), (q1, c1) = times
    assert c3 >= 0.02                # its two batches: 2 images, then 1 (with the other request's)
    assert q1 >= 0.01 and c1 >= 0.01  # the 1-image request waited for the first batch, then ran in the second
    assert 0 <= q3 < q1


def test_dashboard_has_the_panels_and_reads_only_defined_metrics():
    dash = json.loads(DASHBOARD.read_text())
    titles = {p["title"] for p in dash["panels"]}
    for required in ("Latency percentiles by model", "Throughput: requests per second by model and status",
                     "Images served per second", "SLO attainment", "Queue vs compute time (p95)",
                     "Step-batch occupancy", "Engine steps per second", "Dynamic batch size (images per forward)",
                     "Rejections per second", "Policy mix", "Healthy replicas"):
        assert required in titles
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "model"}
    known = defined_series() | SERVE_BUILTINS
    for title, expr in dashboard_exprs():
        names = metric_names(expr)
        assert names and names <= known, f"{title}: {expr} reads {names - known or 'no metric'}"


def test_alert_rules_pass_promtool_and_read_only_defined_metrics():
    check = subprocess.run([binary("promtool"), "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    config = subprocess.run([binary("promtool"), "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")],
                            capture_output=True, text=True)
    assert config.returncode == 0, config.stdout + config.stderr
    rules = rule_exprs()
    alerts = {name for name, _ in rules if not name.startswith("genserve:")}
    assert {"GenserveSLOBurnFast", "GenserveSLOBurnSlow", "GenserveRejectionSpike", "GenserveReplicaDown"} <= alerts
    known = defined_series() | SERVE_BUILTINS
    for name, expr in rules:
        assert metric_names(expr) <= known, f"{name}: {expr} reads {metric_names(expr) - known}"


def test_alert_rules_fire_when_they_should():
    """promtool's rule unit tests (deploy/prometheus/alerts_test.yaml): each alert on synthetic series."""
    result = subprocess.run([binary("promtool"), "test", "rules", "alerts_test.yaml"], cwd=PROMETHEUS_DIR,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- a real Prometheus scraping the session's app -------------------------------------------------------

class Prometheus:
    """Debian's prometheus binary, scraping the app's Ray metrics port every second, with alerts.yaml loaded."""

    def __init__(self, metrics_port: int, tmp: Path):
        self.url = f"http://127.0.0.1:{free_port()}"
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(ALERTS)],
                  "scrape_configs": [{"job_name": "genserve",
                                      "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}]}
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(tmp / "prometheus.log", "w")
        self.process = subprocess.Popen(
            [binary("prometheus"), f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as r:
                return r.status == 200
        except OSError:  # not listening yet, or 503 while it starts
            return False

    def api(self, path: str, **params) -> object:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as err:
            body = json.loads(err.read())
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, promql: str) -> dict[tuple, float]:
        """An instant vector as {label values (sorted by label name, __name__ dropped): value}."""
        return {tuple(v for k, v in sorted(r["metric"].items()) if k != "__name__"): float(r["value"][1])
                for r in self.api("query", query=promql)["result"]}

    def wait_until(self, what: str, ok, timeout_s: float = 60.0):
        deadline = time.monotonic() + timeout_s
        while not (value := ok()):
            assert self.process.poll() is None, f"prometheus exited; see {self.log.name}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.5)
        return value

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    prom = Prometheus(server["metrics_port"], tmp_path_factory.mktemp("prometheus"))
    try:
        prom.wait_until("prometheus to start", prom.ready, timeout_s=30)
        # the app's replicas recorded their model loads at start: once one scrape brings them, it is live
        prom.wait_until("the first scrape of the app",
                        lambda: prom.query("count(ray_genserve_model_load_duration_seconds_count)"), timeout_s=60)
        yield prom
    finally:
        prom.stop()


# What the traffic test reads: query -> {labels: value}; each is a sum by the labels named, so Ray's
# per-process labels (WorkerId, replica, ...) never matter.
GEN = 'route="/v1/images/generations", protocol="openai"'
COUNTS = {
    "requests": f"sum by (model, status) (ray_genserve_request_duration_seconds_count{{{GEN}}})",
    "requests_le_60s": f'sum by (model, status) (ray_genserve_request_duration_seconds_bucket{{{GEN}, le="60.0"}})',
    "images": "sum by (model) (ray_genserve_images_served_total)",
    "batches": "sum by (model) (ray_genserve_batch_size_images_count)",
    "batches_le_2": 'sum by (model) (ray_genserve_batch_size_images_bucket{le="2.0"})',
    "queue": "sum by (model) (ray_genserve_queue_duration_seconds_count)",
    "compute": "sum by (model) (ray_genserve_compute_duration_seconds_count)",
    "slo": "sum by (model, outcome) (ray_genserve_slo_requests_total)",
    "grpc": "sum by (route, status) (ray_genserve_request_duration_seconds_count{protocol=\"grpc\"})",
    "rejections": "sum by (model, reason) (ray_genserve_rejections_total)",
    "decisions": "sum by (candidate) (ray_genserve_policy_decisions_total)",
    "failures": "sum by (model) (ray_genserve_store_verification_failures_total)",
}


def snapshot(prom: Prometheus) -> dict[str, dict[tuple, float]]:
    return {name: prom.query(q) for name, q in COUNTS.items()}


def delta(after: dict, before: dict) -> dict[str, dict[tuple, float]]:
    return {name: {k: v - before[name].get(k, 0.0) for k, v in after[name].items() if v != before[name].get(k, 0.0)}
            for name in after}


def send_traffic(url: str, served_store, tmp: Path) -> None:
    """The requests the counts must match; see EXPECTED."""
    from model_store import IntegrityError
    from serving.config import ONE_PASS_GRAPH
    from serving.runtime import load_model

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    for seed in range(5):  # two of them with a latency SLO they meet, the rest with the default SLO, met too
        extra = {"seed": seed} | ({"latency_slo_ms": 60_000} if seed < 2 else {})
        client.images.generate(model="gan", prompt="sneaker", n=2, extra_body=extra)
    for seed in range(3):
        client.images.generate(model="vae", prompt="bag", n=3, extra_body={"seed": seed})
    client.images.generate(model="diffusion", prompt="shirt", n=1,
                           extra_body={"seed": 0, "steps": 2, "latency_slo_ms": 60_000})
    with pytest.raises(openai.APIStatusError) as late:  # 1 ms, admitted best effort: missed, a 504
        client.images.generate(model="diffusion", prompt="shirt", n=1,
                               extra_body={"seed": 1, "latency_slo_ms": 1, "best_effort": True})
    assert late.value.status_code == 504
    for bad in ({"prompt": "unicorn"}, {"prompt": "shirt", "n": 0}):  # 400s, before any model is called
        with pytest.raises(openai.BadRequestError):
            client.images.generate(model="gan", **bad)
    # What the gRPC ingress records, through the same helper, from this process
    with observe_request("grpc", "ModelInfer") as req:
        req.status, req.error_code = 429, "slo_unattainable"
    # A store version whose artifact changed after publishing: load_model refuses it, and counts it
    corrupt = tmp / "corrupt-store"
    shutil.copytree(Path(served_store.uri) / "gan", corrupt / "gan")
    onnx = next((corrupt / "gan").glob("*/generate.onnx"))
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    with pytest.raises(IntegrityError):
        load_model(str(corrupt), "gan", ONE_PASS_GRAPH)


EXPECTED = {
    "requests": {("gan", "200"): 5, ("vae", "200"): 3, ("diffusion", "200"): 1, ("diffusion", "504"): 1,
                 ("none", "400"): 2},
    "requests_le_60s": {("gan", "200"): 5, ("vae", "200"): 3, ("diffusion", "200"): 1, ("diffusion", "504"): 1,
                        ("none", "400"): 2},
    "images": {("gan",): 10, ("vae",): 9, ("diffusion",): 1},
    # sent one at a time, each request is one forward of its own: gan's of 2 images, vae's of 3
    "batches": {("gan",): 5, ("vae",): 3},
    "batches_le_2": {("gan",): 5},
    "queue": {("gan",): 5, ("vae",): 3, ("diffusion",): 1},  # served requests only
    "compute": {("gan",): 5, ("vae",): 3, ("diffusion",): 1},
    "slo": {("gan", "met"): 5, ("vae", "met"): 3, ("diffusion", "met"): 1, ("diffusion", "missed"): 1},  # every
    # admitted request has an SLO: its own, or the default
    "grpc": {("ModelInfer", "429"): 1},
    "rejections": {("none", "slo_unattainable"): 1},
    # every admitted request, by the policy's candidate: explicit models are admitted too
    "decisions": {("gan",): 5, ("vae",): 3, ("diffusion dpmpp_2m/2 g=2.0",): 1, ("diffusion dpmpp_2m/10 g=2.0",): 1},
    "failures": {("gan",): 1},
}


@pytest.fixture(scope="module")
def traffic(server, served_store, prometheus, tmp_path_factory) -> dict[str, dict[tuple, float]]:
    """Send the traffic once; what Prometheus counted of it, by COUNTS' names, once it matches EXPECTED
    (or after 30 s), plus "steps": the diffusion engine's steps meanwhile."""
    # Other modules' requests may still be on their way (each process exports every second): take the
    # baseline once two snapshots three export intervals apart agree.
    before = snapshot(prometheus)
    while True:
        time.sleep(3 * METRICS_EXPORT_MS / 1000)
        if (again := snapshot(prometheus)) == before:
            break
        before = again
    steps = "sum by (model) (ray_genserve_engine_steps_total)"
    steps_before = prometheus.query(steps).get(("diffusion",), 0.0)

    send_traffic(server["url"], served_store, tmp_path_factory.mktemp("traffic"))

    counted = {}

    def matches() -> bool:
        counted.update(delta(snapshot(prometheus), before))
        counted["steps"] = prometheus.query(steps).get(("diffusion",), 0.0) - steps_before
        return {k: v for k, v in counted.items() if k != "steps"} == EXPECTED and counted["steps"] >= 2

    try:
        prometheus.wait_until("the counts to reach Prometheus", matches, timeout_s=30)
    except AssertionError:
        pass  # the tests show what differs
    return counted


def test_prometheus_counts_match_the_requests_sent(traffic):
    assert {k: v for k, v in traffic.items() if k != "steps"} == EXPECTED
    assert traffic["steps"] >= 2  # the 2-step request's forwards (the late one may run one before it expires)


def test_prometheus_sees_every_metric_with_its_type_and_buckets(prometheus, traffic):
    """Every metric, produced by the traffic or the app's start, has the type and buckets defined. A retry
    needs a replica to die under a request: tests/test_replica_faults.py kills one and reads that counter;
    tests/test_cascade.py reads the cascade's."""
    for m in METRICS:
        if m in (REPLICA_RETRIES, CASCADE_IMAGES):
            continue
        # Prometheus scrapes OpenMetrics when offered, whose counter families drop the _total of their samples
        family = m.series.removesuffix("_total")
        metadata = prometheus.api("metadata", metric=family) or prometheus.api("metadata", metric=m.series)
        assert metadata, f"{m.series} never reached Prometheus"
        assert {entry["type"] for entries in metadata.values() for entry in entries} == {m.kind}, m.series
        if m.kind == HISTOGRAM:
            bounds = prometheus.query(f"count by (le) ({m.series}_bucket)")
            assert sorted(float(le) for (le,) in bounds) == [*m.buckets, float("inf")], m.series
    occupancy = prometheus.query("ray_genserve_engine_batch_occupancy_ratio")
    assert all(0.0 <= v <= 1.0 for v in occupancy.values())
    assert set(prometheus.query("sum by (model) (ray_genserve_model_load_duration_seconds_count)")) == {
        (m,) for m in ("gan", "vae", "flow", "diffusion", "pixelcnn", "judge")}
    # Ray Serve's own metrics the alerts and dashboard read: every genserve deployment healthy
    status = prometheus.query('max by (deployment) (ray_serve_deployment_status{application="genserve"})')
    healthy = prometheus.query('sum by (deployment) (ray_serve_deployment_replica_healthy{application="genserve"})')
    deployments = {("Ingress",), ("gan",), ("vae",), ("flow",), ("diffusion",), ("pixelcnn",), ("judge",)}
    assert set(status) == set(healthy) == deployments
    assert set(status.values()) == {6.0} and set(healthy.values()) == {1.0}  # 6: HEALTHY


def test_dashboard_and_alert_expressions_evaluate_on_live_data(prometheus, traffic):
    grafana = {"$__rate_interval": "1m", "$__range": "5m", "$model": ".*"}
    for title, expr in dashboard_exprs():
        for var, value in grafana.items():
            expr = expr.replace(var, value)
        prometheus.api("query", query=expr)  # a PromQL error is a 400, which api() turns into a failure
    def evaluated():
        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        return rules if all(not r["lastEvaluation"].startswith("0001") for r in rules) else None  # 0001: never

    rules = prometheus.wait_until("every rule's first evaluation", evaluated)
    assert len(rules) == len(rule_exprs())
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    firing = [r["name"] for r in rules if r["type"] == "alerting" and r["state"] == "firing"]
    assert firing == []  # a healthy app pages nobody
