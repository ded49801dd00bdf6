"""The ingress's side of the latency/quality policy (serving.policy): every generation passes through
`Admission.admit` before it reaches a model and `Admission.finish` after, whatever the protocol.

- `model: "auto"` lets the policy choose the model and its sampler settings; a named model is served as
  asked, but still admitted only if it is predicted to meet its deadline (else 429 + Retry-After, unless
  the request said best_effort).
- A background task reads each replica's live load (`stats()`) a few times a second, so predictions
  follow load that the policy did not admit itself (another ingress replica, requests in flight at start);
  a replica whose model failed to load answers why instead, and its model leaves `auto`'s choices and is
  refused at once (503) until a read finds it serving.
- Every request has a deadline, admitted against like an SLO: the tightest of its latency_slo_ms and the
  client's own timeout (the X-Request-Timeout-Ms header, `client_timeout_s`); when it sets neither, the
  policy's default (AppArgs.default_slo_ms; PolicyConfig says how), which the job then carries.

One Admission per ingress replica, used from its one event loop (the policy is not thread-safe)."""
import asyncio
import dataclasses
import math
import time
from contextvars import ContextVar
from typing import Any

from ray.serve.handle import DeploymentHandle

from model_store.manifest import Manifest
from serving.api.jobs import GenerationJob, PolicyHints, ReplicaLoad
from serving.api.errors import APIError, invalid
from serving.errors import ModelUnavailable
from serving.policy import Decision, Hints, LiveState, Outcome, Policy, PolicyConfig, Rejection, ServedModel

LIVE_PERIOD_S = 0.2    # how often replicas' load is read: a diffusion step at full batch is ~0.15 s here
# Of a client's SLO, what the ingress leaves for the answer's way out (and for the hop in, when the request
# carries no START_HEADER), which its clock does not see: a real load ramp here measured a median 29 ms
# between the client's and the ingress's times
EDGE_MS = 20.0

# When the request left its client or reached the first load balancer, as a Unix time: "t=<seconds>", as
# nginx writes it (proxy_set_header X-Request-Start "t=${msec}"), or in ms or us (as New Relic reads it).
# The time between then and the ingress (the proxy's queue under load, the network) is spent from the
# request's SLO and client timeout, so the policy plans with what is really left. A value in the future or
# over a minute old is a clock that disagrees with ours: ignored, not trusted (and never a 400: a load
# balancer, not the client, may have set it).
START_HEADER = "X-Request-Start"
MAX_START_AGE_S = 60.0
_spent_before: ContextVar[float] = ContextVar("genserve_spent_before", default=0.0)

# The client's own timeout for one request, in milliseconds, from its arrival at the ingress (an HTTP header;
# gRPC clients may send it as metadata). The OpenAI client's timeout= only closes the connection, which
# cancels the work too, but unannounced: the policy cannot plan for it.
TIMEOUT_HEADER = "X-Request-Timeout-Ms"
# (arrival on time.monotonic(), the header's raw value) of the request in flight on this task; set by the
# ingress's middleware, read by client_timeout_s
_client_timeout: ContextVar[tuple[float, str] | None] = ContextVar("genserve_client_timeout", default=None)


def note_client_timeout(value: str | None, arrival: float) -> None:
    """The request in flight carries a client timeout (TIMEOUT_HEADER's value; None: it has none)."""
    _client_timeout.set(None if value is None else (arrival, value))


def note_request_start(value: str | None, arrival: float) -> None:
    """The request in flight carries START_HEADER's value (None: it has none); arrival on time.time()."""
    _spent_before.set(_seconds_since(value, arrival) if value else 0.0)


def spent_before_ingress_s() -> float:
    """Seconds of the request's budget spent before the ingress saw it (0 without START_HEADER)."""
    return _spent_before.get()


def _seconds_since(value: str, now: float) -> float:
    try:
        t = float(value.strip().removeprefix("t="))
    except ValueError:
        return 0.0
    t /= 1e6 if t > 1e14 else 1e3 if t > 1e11 else 1.0  # us, ms or s since the epoch
    spent = now - t
    return spent if 0.0 <= spent <= MAX_START_AGE_S else 0.0


def client_timeout_s() -> float | None:
    """Seconds left of the request's client timeout (at least 1 ms), None without one. Raises APIError 400
    for a value that is not a number of milliseconds > 0."""
    noted = _client_timeout.get()
    if noted is None:
        return None
    arrival, value = noted
    try:
        ms = float(value)
    except ValueError:
        ms = math.nan
    if not (math.isfinite(ms) and ms > 0):
        raise invalid(TIMEOUT_HEADER, f"{TIMEOUT_HEADER} must be a number of milliseconds > 0, got {value[:40]!r}")
    return max(0.001, arrival + ms / 1000 - time.monotonic())


def with_request_deadline(jobs: list[GenerationJob]) -> list[GenerationJob]:
    """The jobs with the request's deadline: the client's timeout if tighter than their own, less the time
    spent before the ingress (START_HEADER)."""
    if (left := client_timeout_s()) is not None:  # the client's timeout is the deadline if tighter
        jobs = [dataclasses.replace(j, timeout_s=min(j.timeout_s or left, left)) for j in jobs]
    if spent := spent_before_ingress_s():  # X-Request-Start: the budget counts from the client's side
        jobs = [dataclasses.replace(j, timeout_s=max(0.001, j.timeout_s - spent)) if j.timeout_s else j for j in jobs]
    return jobs


class Admission:
    def __init__(self, manifests: dict[str, Manifest], default_slo_ms: float = PolicyConfig.default_slo_ms):
        self.policy = Policy([ServedModel(name, m) for name, m in manifests.items()],
                             PolicyConfig(default_slo_ms=default_slo_ms, edge_ms=EDGE_MS))
        self._candidates = list(self.policy.candidates)  # every served model's, for when one comes back
        self.unavailable: dict[str, str] = {}  # model -> why its replica cannot serve it, as its stats() said
        self._live: asyncio.Task | None = None

    def admit(self, model: str, job: GenerationJob, hints: PolicyHints | None = None) -> tuple[Decision, GenerationJob]:
        """On arrival: the decision and the job to send (the chosen model's settings filled in, and the default
        deadline when it had none: the SLO it was admitted against, at the ingress). Raises
        APIError 429 (Retry-After when waiting helps), 503 (the model named failed to load) or 400 (no
        served model can do what was asked)."""
        if model in self.unavailable:
            raise APIError(503, self.unavailable[model], code="model_unavailable")
        hints = hints or PolicyHints()
        ask = Hints(model=model, n=job.n, class_id=job.class_id,
                    latency_slo_ms=job.timeout_s * 1000 if job.timeout_s else None,
                    tier=hints.tier, max_fd=hints.max_fd, min_class_accuracy=hints.min_class_accuracy,
                    goal=hints.goal, best_effort=hints.best_effort, setting=job.setting)
        outcome = self.policy.decide(ask, time.monotonic())
        if isinstance(outcome, Rejection):
            raise APIError(outcome.http_status, outcome.message, code=outcome.reason, retry_after_s=outcome.retry_after_s)
        default = None if hints.best_effort else outcome.slo_ms / 1000  # best effort: late rather than dropped
        return outcome, dataclasses.replace(job, setting=outcome.setting, timeout_s=job.timeout_s or default)

    def finish(self, decision: Decision, outcome: Outcome) -> dict[str, Any]:
        """When the request ended, however: the response's account of the choice, with the actual latency."""
        done = self.policy.finish(decision.ticket, time.monotonic(), outcome)
        return {**decision.explain(), "actual_ms": round(done.actual_ms, 1), "slo_met": done.met}

    def watch(self, handles: dict[str, DeploymentHandle]) -> None:
        """Start reading the replicas' load (once, from the event loop)."""
        if self._live is None or self._live.done():
            self._live = asyncio.get_running_loop().create_task(self._watch(handles))

    async def _watch(self, handles: dict[str, DeploymentHandle]) -> None:
        while True:
            names = [n for n in handles if n in self.policy.loads]
            results = await asyncio.gather(*(handles[n].stats.remote() for n in names), return_exceptions=True)
            for name, load in zip(names, results):
                if isinstance(load, ReplicaLoad):  # else the replica is down or restarting: skip this read
                    self.policy.observe_live(name, LiveState(time.monotonic(), **dataclasses.asdict(load)))
                self._available(name, load)
            await asyncio.sleep(LIVE_PERIOD_S)

    def _available(self, name: str, load: object) -> None:
        """A stats() answer: a ReplicaLoad means the model serves, a ModelUnavailable that it failed to load
        (anything else, e.g. a replica restarting, changes nothing). `auto` chooses among serving models."""
        before = set(self.unavailable)
        if isinstance(load, ModelUnavailable):
            self.unavailable[name] = str(getattr(load, "cause", None) or load)
        elif isinstance(load, ReplicaLoad):
            self.unavailable.pop(name, None)
        if set(self.unavailable) != before:
            self.policy.candidates = [c for c in self._candidates if c.model not in self.unavailable]
