"""Every genserve metric, defined once: name, type, unit, buckets and labels, and the one-line helpers the
serving code records them with.

They go out through Ray's metrics API (ray.serve.metrics): each process (ingress, model replicas) hands
its values to the node's Ray metrics agent, which serves them all in Prometheus' text format on ONE port
per node (`ray.init(_metrics_export_port=...)`, `ray start --metrics-export-port`; genserve up: 8080 when
free, KubeRay's default). prometheus-client would need a port per replica process, found by service discovery.
Ray names a metric `ray_<name>` and adds Component, NodeAddress, SessionName, Version and WorkerId labels;
ray.serve.metrics adds deployment, replica and application inside a Serve replica. Processes export every
`metrics_report_interval_ms` (Ray's default 10 s; the tests set 1 s). Ray's agent rebuilds each histogram
from its bucket counts, so a histogram's _sum is approximate (every observation counts at its bucket's
midpoint): read histograms through _bucket and _count, which are exact.

Ray Serve's own metrics cover what it sees without knowing genserve: per route and status code at the
proxy (ray_serve_num_http_requests_total, ray_serve_http_request_latency_ms), per deployment
(ray_serve_deployment_request_counter_total, ray_serve_deployment_processing_latency_ms,
ray_serve_deployment_queued_queries, ray_serve_deployment_replica_healthy, ...). These add what only
genserve knows: the model a request was served by (after `auto`), the protocol, queue vs compute time in
the replica, images, engine occupancy, policy decisions, SLOs and store integrity, in base units.

Nothing here is recorded outside a Ray worker (the CLI and unit tests load models too): every helper is
a no-op there.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.engine.metrics import EngineMetrics

METRICS_PORT = 8080  # Ray's metrics export port for `genserve up`; KubeRay's default for Ray pods too

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

# 1 ms (a small one-pass batch) to 60 s (a long PixelCNN queue); about 2.5x apart
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # images per forward; powers of two, as batch limits are
# a replica's start: verifying a store version and opening a session (seconds), to a TensorRT build (minutes)
LOAD_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

NO_MODEL = "none"  # the model label of a request that never reached one (a 400 on its body, GET /v1/models)
REJECTED_STATUSES = (429, 503)  # answers that refuse work: admission control, overload, a stopping engine


@dataclass(frozen=True)
class MetricSpec:
    name: str                          # Prometheus name without Ray's `ray_` prefix; counters end in _total
    kind: str                          # COUNTER | GAUGE | HISTOGRAM
    description: str                   # what it counts, and its unit
    labels: tuple[str, ...]            # genserve's own labels (Ray and Serve add theirs)
    buckets: tuple[float, ...] = ()    # histograms: upper bounds, ascending

    @property
    def series(self) -> str:
        """The name to query in Prometheus (histograms add _bucket, _sum, _count)."""
        return f"ray_{self.name}"

    @property
    def ray_name(self) -> str:
        """The name given to Ray: its exporter appends _total to a counter itself."""
        return self.name.removesuffix("_total") if self.kind == COUNTER else self.name


REQUEST_DURATION = MetricSpec(
    "genserve_request_duration_seconds", HISTOGRAM,
    "Requests at the ingress, from arrival to answer, in seconds; status is the HTTP(-equivalent) code",
    ("model", "route", "protocol", "status"), LATENCY_BUCKETS_S)
QUEUE_DURATION = MetricSpec(
    "genserve_queue_duration_seconds", HISTOGRAM,
    "Served requests in a model replica: from arrival to their first forward pass, in seconds",
    ("model",), LATENCY_BUCKETS_S)
COMPUTE_DURATION = MetricSpec(
    "genserve_compute_duration_seconds", HISTOGRAM,
    "Served requests in a model replica: from their first forward pass to their images, in seconds",
    ("model",), LATENCY_BUCKETS_S)
IMAGES_SERVED = MetricSpec(
    "genserve_images_served_total", COUNTER, "Images returned to clients", ("model",))
BATCH_SIZE = MetricSpec(
    "genserve_batch_size_images", HISTOGRAM,
    "Images per forward pass of a one-pass model's dynamic batcher", ("model",), BATCH_BUCKETS)
ENGINE_OCCUPANCY = MetricSpec(
    "genserve_engine_batch_occupancy_ratio", GAUGE,
    "Step-batched engine: rows in the last forward over the row budget (0..1; 0 when idle)", ("model",))
ENGINE_RUNNING = MetricSpec(
    "genserve_engine_running_requests", GAUGE, "Step-batched engine: requests in the batch", ("model",))
ENGINE_WAITING = MetricSpec(
    "genserve_engine_waiting_requests", GAUGE, "Step-batched engine: requests queued for room", ("model",))
ENGINE_STEP_RATE = MetricSpec(
    "genserve_engine_steps_per_second", GAUGE,
    "Step-batched engine: steps per second of time spent stepping, over its last 50 steps (capacity; "
    "rate(genserve_engine_steps_total) is the achieved rate)", ("model",))
ENGINE_STEPS = MetricSpec(
    "genserve_engine_steps_total", COUNTER, "Step-batched engine: steps (one forward pass each)", ("model",))
POLICY_DECISIONS = MetricSpec(
    "genserve_policy_decisions_total", COUNTER,
    "Requests the policy routed to each candidate (model and sampler setting)", ("candidate",))
CASCADE_IMAGES = MetricSpec(
    "genserve_cascade_images_total", COUNTER,
    "Images of cascade requests by outcome: passed (the judge kept stage 1's), escalated (diffusion made it "
    "again), skipped_no_time, escalation_failed, judge_failed, not_planned (served without a cascade)",
    ("outcome",))
SLO_REQUESTS = MetricSpec(
    "genserve_slo_requests_total", COUNTER,
    "Requests with a latency SLO, by outcome: met (answered within it) or missed (late, timed out, "
    "rejected or failed)", ("model", "outcome"))
REJECTIONS = MetricSpec(
    "genserve_rejections_total", COUNTER,
    "Requests refused with 429 or 503, by the API error code", ("model", "reason"))
MODEL_LOAD = MetricSpec(
    "genserve_model_load_duration_seconds", HISTOGRAM,
    "Loading a model version in a replica: store verification and session creation, in seconds",
    ("model",), LOAD_BUCKETS_S)
VERIFICATION_FAILURES = MetricSpec(
    "genserve_store_verification_failures_total", COUNTER,
    "Model loads refused because a store version failed its hash or manifest checks", ("model",))
MODEL_READY = MetricSpec(
    "genserve_model_ready", GAUGE,
    "Model replicas: 1 while it serves its model, 0 when it failed to load it (a tampered or missing artifact): "
    "such a replica stays up answering 503, and GET /v2/health/ready names it", ("model",))
REPLICA_RETRIES = MetricSpec(
    "genserve_replica_retries_total", COUNTER,
    "Model calls sent again to another replica because the one serving them died (its node lost, a crash)",
    ("model",))

METRICS = (REQUEST_DURATION, QUEUE_DURATION, COMPUTE_DURATION, IMAGES_SERVED, BATCH_SIZE, ENGINE_OCCUPANCY,
           ENGINE_RUNNING, ENGINE_WAITING, ENGINE_STEP_RATE, ENGINE_STEPS, POLICY_DECISIONS, CASCADE_IMAGES,
           SLO_REQUESTS, REJECTIONS, MODEL_LOAD, VERIFICATION_FAILURES, MODEL_READY, REPLICA_RETRIES)


# ---- this process's Ray metric objects -------------------------------------------------------------------

_live: dict[str, Any] = {}
_lock = threading.Lock()  # the engine's thread and the event loop may record first at the same time


def _metric(spec: MetricSpec):
    """This process's Ray metric for spec, created at first use: inside a replica, so that Serve's
    deployment / replica / application labels are attached. None outside a Ray worker."""
    import ray

    if not ray.is_initialized():
        return None
    with _lock:
        if spec.name not in _live:
            from ray.serve import metrics

            if spec.kind == COUNTER:
                _live[spec.name] = metrics.Counter(spec.ray_name, spec.description, spec.labels)
            elif spec.kind == GAUGE:
                _live[spec.name] = metrics.Gauge(spec.ray_name, spec.description, spec.labels)
            else:
                _live[spec.name] = metrics.Histogram(spec.ray_name, spec.description, list(spec.buckets), spec.labels)
        return _live[spec.name]


def _inc(spec: MetricSpec, value: float = 1, **labels: str) -> None:
    if value > 0 and (m := _metric(spec)) is not None:
        m.inc(value, labels)


def _set(spec: MetricSpec, value: float, **labels: str) -> None:
    if (m := _metric(spec)) is not None:
        m.set(value, labels)


def _observe(spec: MetricSpec, value: float, **labels: str) -> None:
    if (m := _metric(spec)) is not None:
        m.observe(value, labels)


# ---- requests at the ingress, whatever the protocol ------------------------------------------------------

@dataclass
class RequestObservation:
    """One request in flight at the ingress; the protocol layer and Ingress.generate_with fill it in."""

    protocol: str                      # "openai" (/v1), "kserve" (/v2), "grpc", "http" (anything else)
    route: str                         # route template ("/v1/models/{model_id}") or gRPC method name
    model: str = NO_MODEL              # set by the ingress's call to a model (note_model)
    status: int | None = None          # the HTTP(-equivalent) status answered; unset: 200, or 500 on an
                                       # exception (499 if the client went away)
    error_code: str | None = None      # the API error code, for the rejection reason


_current: ContextVar[RequestObservation | None] = ContextVar("genserve_request", default=None)


@contextmanager
def observe_request(protocol: str, route: str) -> Iterator[RequestObservation]:
    """Times one request at the ingress and records it on exit (duration; a rejection for 429/503). The
    HTTP middleware wraps every HTTP request in it; a gRPC method wraps its body:

        with observe_request("grpc", "ModelInfer") as req:
            ...                               # the ingress's call to a model notes it on `req`
            req.status, req.error_code = exc.status, exc.code   # when answering an APIError
    """
    req = RequestObservation(protocol, route)
    token = _current.set(req)
    start = time.perf_counter()
    try:
        yield req
    except asyncio.CancelledError:
        req.status = req.status or 499  # the client went away (nginx's code): not a server error
        raise
    except BaseException:
        req.status = req.status or 500
        raise
    finally:
        _current.reset(token)
        status = req.status or 200
        _observe(REQUEST_DURATION, time.perf_counter() - start, model=req.model, route=req.route,
                 protocol=req.protocol, status=str(status))
        if status in REJECTED_STATUSES:
            record_rejection(req.model, req.error_code or f"http_{status}")


def note_error_code(code: str | None) -> None:
    """The API error the request in flight is answered with (its code labels a rejection)."""
    if (req := _current.get()) is not None:
        req.error_code = code


def note_model(model: str) -> None:
    """The model the request in flight was sent to (its model label)."""
    if (req := _current.get()) is not None:
        req.model = model


@contextmanager
def observe_model_call(model: str, n: int, slo_s: float | None) -> Iterator[None]:
    """Around the ingress's call to a model for n images: on success counts them served; for a request
    with a latency SLO, records it met or missed."""
    start = time.perf_counter()
    try:
        yield
    except Exception:
        if slo_s is not None:
            record_slo(model, met=False)
        raise
    if slo_s is not None:
        record_slo(model, met=time.perf_counter() - start <= slo_s)
    _inc(IMAGES_SERVED, n, model=model)


# ---- the model replicas -------------------------------------------------------------------------------

def record_request_times(model: str, queue_s: float, compute_s: float) -> None:
    """A served request's time in the replica: waiting for its first forward, then until its images."""
    _observe(QUEUE_DURATION, queue_s, model=model)
    _observe(COMPUTE_DURATION, compute_s, model=model)


def record_batch(model: str, images: int) -> None:
    """One forward pass of a one-pass model's batcher."""
    _observe(BATCH_SIZE, images, model=model)


def record_engine(model: str, metrics: EngineMetrics, steps_before: int) -> int:
    """The step-batched engine's gauges, and its steps since steps_before; returns its step count."""
    _set(ENGINE_OCCUPANCY, metrics.batch_occupancy, model=model)
    _set(ENGINE_RUNNING, metrics.running, model=model)
    _set(ENGINE_WAITING, metrics.queue_length, model=model)
    _set(ENGINE_STEP_RATE, metrics.steps_per_second, model=model)
    steps = metrics.steps
    _inc(ENGINE_STEPS, steps - steps_before, model=model)
    return steps


def record_model_load(model: str, seconds: float) -> None:
    _observe(MODEL_LOAD, seconds, model=model)


def record_verification_failure(model: str) -> None:
    _inc(VERIFICATION_FAILURES, model=model)


READY_PERIOD_S = 0.5  # under Ray's export interval (>= 1 s): a gauge lapses after two intervals without a value


async def report_model_ready(model: str, ready: bool) -> None:
    """Runs for a model replica's life as a task on its event loop: whether it loaded its model."""
    while True:
        _set(MODEL_READY, 1.0 if ready else 0.0, model=model)
        await asyncio.sleep(READY_PERIOD_S)


def record_retry(model: str) -> None:
    """A call to model went to another replica after the one serving it died."""
    _inc(REPLICA_RETRIES, model=model)


# ---- the policy -----------------------------------------------------------------------------------------

def record_decision(candidate: str) -> None:
    """The policy routed a request to candidate (serving.policy.candidates.Candidate.label)."""
    _inc(POLICY_DECISIONS, candidate=candidate)


def record_cascade(outcome: str) -> None:
    """One image of a cascade request was delivered (serving.api.cascade's outcomes)."""
    _inc(CASCADE_IMAGES, outcome=outcome)


def record_slo(model: str, met: bool) -> None:
    _inc(SLO_REQUESTS, model=model, outcome="met" if met else "missed")


def record_rejection(model: str, reason: str) -> None:
    """A request refused (429/503); reason is the API error code. observe_request calls it for every such
    answer, so the policy only needs to raise its APIError."""
    _inc(REJECTIONS, model=model, reason=reason)
