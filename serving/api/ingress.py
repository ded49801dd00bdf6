"""The ingress deployment: every public protocol in, validated GenerationJobs out to the model deployments.
Each HTTP protocol's routes are a router included in the shared FastAPI app (serving/api/http.py); this
class holds what they share: the model handles and the one call to a model, bounded by the request's deadline, with
the model's failures mapped to API errors (serving.api.errors.APIError, which each protocol renders in
its own shape).

Deadlines: a request's deadline is the tightest of its latency_slo_ms, the client's X-Request-Timeout-Ms
header (serving.api.admission) and the ingress timeout; it is admitted against it, the model call is cut at
it (504), and the job carries what is left of it to the replica, whose step engine drops it at the first
step past it. Overload: a full bounded queue anywhere (Serve's max_queued_requests in front of a model, the
step engine's max_waiting_rows) is a 503 with Retry-After at once (gRPC RESOURCE_EXHAUSTED).

Imports no runtime and no torch: the model deployments hold the sessions and the engine."""
import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import BackPressureError, RequestCancelledError
from ray.serve.handle import DeploymentHandle

from serving.api.http import api, logger
from model_store.manifest import Manifest
from serving.api.cascade import Cascade, run_cascade
from serving.api.admission import (START_HEADER, TIMEOUT_HEADER, Admission, Outcome, client_timeout_s,
                                   note_client_timeout, note_request_start, with_request_deadline)
from serving.api.jobs import (GenerationJob, GenerationPreview, GenerationResult, ImagesJob, InterpolationJob,
                              PolicyHints)
from serving.api.errors import APIError
from serving.api import family_routes, kserve_http, openai_routes, playground
from serving.api.kserve import OpenInference
from serving.api.kserve_grpc import GRPCInferenceService
from serving.api.validation import AUTO
from serving.config import ITERATIVE_GRAPH
from serving.errors import DeadlineExceeded, EngineOverloaded, EngineStopped, ModelUnavailable, RequestCancelled
from serving.observability import note_model, observe_model_call, record_decision, record_retry
from serving.policy import Decision

# A full queue drains within about a batch's time (a diffusion step at full batch is ~0.15 s here): a client
# told to come back in a second finds room, and is not told to wait out a whole queue it would not be in
RETRY_OVERLOADED_S = 1.0
# Errors a model deployment raises on purpose (serving.errors, torch-free) -> status, error code, Retry-After
_REQUEST_ERRORS = {DeadlineExceeded: (504, "deadline_exceeded", None),
                   RequestCancelled: (503, "request_cancelled", None),
                   EngineStopped: (503, "engine_stopped", None),
                   EngineOverloaded: (503, "overloaded", RETRY_OVERLOADED_S),
                   ModelUnavailable: (503, "model_unavailable", None)}

# A call whose replica died is sent again (seeded jobs are idempotent) at most this often, and only with at
# least MIN_RETRY_S of its deadline left: a retry that cannot finish would only add load to the survivors.
MAX_REPLICA_RETRIES = 2
MIN_RETRY_S = 0.05

api.include_router(openai_routes.router)
api.include_router(family_routes.router)
api.include_router(playground.router)
api.include_router(kserve_http.router)


class ClientTimeout:
    """ASGI middleware: notes each HTTP request's X-Request-Timeout-Ms and X-Request-Start (serving.api.admission)
    for the ingress's generate / operate, which read them in the request's own context."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k: v.decode("latin-1") for k, v in scope["headers"] if k in (_TIMEOUT_KEY, _START_KEY)}
            note_client_timeout(headers.get(_TIMEOUT_KEY), time.monotonic())
            note_request_start(headers.get(_START_KEY), time.time())
        await self.app(scope, receive, send)


_TIMEOUT_KEY, _START_KEY = TIMEOUT_HEADER.lower().encode(), START_HEADER.lower().encode()
api.add_middleware(ClientTimeout)


# the bounds deploy/serve_config.yaml sets, for apps built without it (the benchmarks')
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=500, max_queued_requests=100)
@serve.ingress(api)
class Ingress(GRPCInferenceService):  # gRPC: Serve's proxy calls the method named after the RPC
    def __init__(self, models: dict[str, DeploymentHandle], manifests: dict[str, Manifest], timeout_s: float,
                 admission: bool = True, default_slo_ms: float = 3000.0, judge: DeploymentHandle | None = None):
        """models: name -> handle of its deployment; manifests: name -> its version's manifest (family,
        quality, latency profile: the policy's inputs), read from the store at build. admission False: no
        policy (explicit models only, nothing refused), for the benchmarks' plain baseline. judge: the
        cascade's judge deployment (serving/judge), None: no cascades."""
        self.models, self.timeout_s = models, timeout_s
        self.families = {name: m.family for name, m in manifests.items()}
        self.admission = Admission(manifests, default_slo_ms) if admission else None
        self.v2 = OpenInference(self)  # KServe v2's operations, for its HTTP routes and gRPC methods
        self.cascade = Cascade(judge) if judge is not None else None

    def check_health(self) -> None:
        """Serve's liveness probe (every health_check_period_s): the ingress holds a handle for every model it
        was built with. Whether those models serve is readiness (/v2/health/ready), not the ingress's
        liveness: restarting the ingress would mend no model, and would cut every request in flight."""
        if not self.models or not all(isinstance(h, DeploymentHandle) for h in self.models.values()):
            raise RuntimeError(f"the ingress has no model handles: {self.models!r}")

    async def generate(self, model: str, jobs: list[GenerationJob], hints: PolicyHints | None = None
                       ) -> list[GenerationResult]:
        """One request's images, through the policy: admitted once for all its jobs, `auto` resolved to the
        model and settings the policy chose, the jobs run concurrently. Each result carries the policy's
        account of the choice. Raises APIError (429 + Retry-After when nothing can meet the deadline, the
        model call's errors otherwise)."""
        if hints is not None and hints.cascade:  # one-pass first, diffusion for what the judge fails
            return await run_cascade(self, model, jobs, hints)
        decision, model, jobs = self._admit(model, jobs, hints)
        async with self._accounted(decision) as account:
            results = await _all(self.generate_with(model, job) for job in jobs)
        return [dataclasses.replace(r, policy=account.get("policy")) for r in results]

    async def generate_stream(self, model: str, jobs: list[GenerationJob], hints: PolicyHints | None = None
                              ) -> AsyncIterator[tuple[int, GenerationPreview | GenerationResult]]:
        """generate, streamed: (job index, event) pairs: each job's previews (job.previews of them; iterative
        models only) as its model's engine makes them, then every job's GenerationResult with the policy's
        account. Admitted as generate, on the first __anext__ (which raises its APIError). Closing the stream
        early (the client went away) cancels the model calls: their rows leave the engine at its next step.
        A cascade streams its final images only: its stages are one-pass first, diffusion only for some."""
        if hints is not None and hints.cascade:
            for i, result in enumerate(await self.generate(model, jobs, hints)):
                yield i, result
            return
        decision, model, jobs = self._admit(model, jobs, hints)
        results: dict[int, GenerationResult] = {}
        async with self._accounted(decision) as account:
            async with aclosing(_merged([self._stream_job(model, job) for job in jobs])) as events:
                async for i, event in events:
                    if isinstance(event, GenerationResult):
                        results[i] = event  # finals go out together, once the account is complete
                    else:
                        yield i, event
        for i in sorted(results):
            yield i, dataclasses.replace(results[i], policy=account.get("policy"))

    def _admit(self, model: str, jobs: list[GenerationJob], hints: PolicyHints | None
               ) -> tuple[Decision | None, str, list[GenerationJob]]:
        """The request's deadline on its jobs (the client's timeout if tighter, less the time spent before the
        ingress), then the policy's decision (None without admission): the model to call and the jobs to send."""
        jobs = with_request_deadline(jobs)
        if self.admission is None:
            if model == AUTO:
                raise APIError(400, "model 'auto' needs the policy, which this application runs without "
                                    "(args.admission: false); name a model", param="model")
            return None, model, jobs
        self.admission.watch(self.models)
        whole = dataclasses.replace(jobs[0], n=sum(j.n for j in jobs))
        decision, chosen = self.admission.admit(model, whole, hints)
        record_decision(decision.label)
        return decision, decision.model, [dataclasses.replace(j, setting=chosen.setting, timeout_s=chosen.timeout_s)
                                          for j in jobs]

    @contextlib.asynccontextmanager
    async def _accounted(self, decision: Decision | None) -> AsyncIterator[dict[str, Any]]:
        """Around an admitted request's model calls: tells the policy how it ended, and leaves the response's
        account of the choice (with the actual latency) in the yielded dict's "policy"."""
        account: dict[str, Any] = {}
        if decision is None:
            yield account
            return
        outcome = Outcome.FAILED
        try:
            yield account
            outcome = Outcome.OK
        except APIError as err:
            outcome = Outcome.EXPIRED if err.status == 504 else Outcome.FAILED
            raise
        except (asyncio.CancelledError, GeneratorExit):
            outcome = Outcome.CANCELLED
            raise
        finally:
            account["policy"] = self.admission.finish(decision, outcome)

    async def _stream_job(self, model: str, job: GenerationJob) -> AsyncIterator[GenerationPreview | GenerationResult]:
        """One job's previews and result, outside the policy. A one-pass model (or a job without previews)
        answers in one call; an iterative model streams from its generate_stream, within the job's deadline."""
        if not job.previews or self.families[model] not in ITERATIVE_GRAPH:
            yield await self.generate_with(model, job)
            return
        note_model(model)
        timeout = min(job.timeout_s or self.timeout_s, client_timeout_s() or math.inf)
        with observe_model_call(model, job.n, job.timeout_s):
            stream = self.models[model].options(stream=True).generate_stream.remote(
                dataclasses.replace(job, timeout_s=timeout))
            try:
                async with asyncio.timeout(timeout):
                    async for event in stream:
                        yield event
            except TimeoutError:
                raise APIError(504, f"{model} did not answer within {timeout * 1000:.0f} ms",
                               code="deadline_exceeded") from None
            except (APIError, asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as exc:
                raise _model_error(model, exc) from None
            finally:
                stream.cancel()  # a no-op once it ended; else the request leaves the engine at its next step

    async def generate_with(self, model: str, job: GenerationJob) -> GenerationResult:
        """One job on a served model, outside the policy (generate() admits first): one call to the model's deployment, bounded by the job's SLO (else the ingress timeout); its
        model, images and SLO outcome go to the request's metrics."""
        with observe_model_call(model, job.n, job.timeout_s):
            return await self._call_model(model, job)

    async def operate(self, model: str, method: str, job: InterpolationJob | ImagesJob) -> Any:
        """One of a family's own operations: method is interpolate, reconstruct or log_likelihood (the
        model deployment's method; serving.api.family_ops checked the model has it). Bounded by the ingress
        timeout, its failures mapped as generate_with's."""
        return await self._call_model(model, job, method)

    async def _call_model(self, model: str, job: GenerationJob | InterpolationJob | ImagesJob,
                          method: str = "generate") -> Any:
        """One call to a model's deployment within the job's deadline. A replica that dies under the call (its
        node lost, a crash) is not the request's failure: every job is seeded (the API fixes a seed when the
        client gives none), so the same job on another replica returns the same images, and it is sent again
        while the deadline leaves time. Serve's router drops the dead replica from its choices at once."""
        note_model(model)  # the request's model label
        timeout = getattr(job, "timeout_s", None) or self.timeout_s
        if (left := client_timeout_s()) is not None:
            timeout = min(timeout, left)
        deadline = time.monotonic() + timeout
        for attempt in range(1 + MAX_REPLICA_RETRIES):
            try:
                return await self._call_replica(model, job, method, deadline - time.monotonic(), timeout)
            except (ActorDiedError, ActorUnavailableError) as lost:
                if attempt == MAX_REPLICA_RETRIES or deadline - time.monotonic() < MIN_RETRY_S:
                    raise APIError(503, f"{model}'s replica was lost mid-request and no other could answer in "
                                        "time; retry shortly", code="replica_lost",
                                   retry_after_s=1.0) from None
                logger.warning("genserve ingress: %s's replica was lost (%s); retrying on another",
                               model, type(lost).__name__)
                record_retry(model)

    async def _call_replica(self, model: str, job: GenerationJob | InterpolationJob | ImagesJob, method: str,
                            remaining_s: float, timeout_s: float) -> Any:
        """One attempt: the model's errors mapped to API errors, but a lost replica raised as Ray's own error
        for _call_model to retry. A generation carries what is left of its deadline (every request has one),
        so the replica drops it from the step batch when the ingress stops waiting for it."""
        if isinstance(job, GenerationJob):
            job = dataclasses.replace(job, timeout_s=max(remaining_s, 0.001))
        response = getattr(self.models[model], method).remote(job)
        try:
            return await asyncio.wait_for(response, max(remaining_s, 0.001))  # a DeploymentResponse is awaitable
        except asyncio.CancelledError:  # the caller gave up (e.g. a sibling call failed): so does the model
            response.cancel()
            raise
        except TimeoutError:
            response.cancel()  # the job leaves the model's queue (or the engine's batch) too
            raise APIError(504, f"{model} did not answer within {timeout_s * 1000:.0f} ms", code="deadline_exceeded") from None
        except BackPressureError:  # Serve's queue in front of the model (max_queued_requests) is full
            raise APIError(503, f"{model} is at capacity; retry shortly", code="overloaded",
                           retry_after_s=RETRY_OVERLOADED_S) from None
        except RequestCancelledError:
            raise APIError(503, f"the request to {model} was cancelled", code="request_cancelled") from None
        except Exception as exc:
            raise _model_error(model, exc) from None


def _model_error(model: str, exc: Exception) -> Exception:
    """What a model call's exception becomes: its APIError (serving.errors' on purpose errors, a ValueError's
    400, else a 500 whose details go to the log, not the client), or Ray's own error for a lost replica."""
    cause = getattr(exc, "cause", None) or exc  # a RayTaskError carries the replica's exception
    if isinstance(cause, (ActorDiedError, ActorUnavailableError)):
        return cause
    for error, (status, code, retry_after_s) in _REQUEST_ERRORS.items():
        if isinstance(cause, error):
            return APIError(status, str(cause), code=code, retry_after_s=retry_after_s)
    if isinstance(cause, ValueError):  # a check the deployment makes (the API checks first)
        return APIError(400, str(cause))
    logger.error("genserve ingress: %s failed", model, exc_info=exc)
    return APIError(500, f"{model} failed ({type(cause).__name__}); the server log has the details", code="model_error")


async def _merged(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """(i, item) from every stream as each item comes, each stream read by its own task; the first failure
    is raised, and it (or closing the merged stream early) cancels the rest."""
    queue: asyncio.Queue[tuple[int, Any, Exception | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async with aclosing(stream):
                async for item in stream:
                    await queue.put((i, item, None))
            await queue.put((i, _END, None))
        except Exception as exc:
            await queue.put((i, None, exc))

    tasks = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, item, error = await queue.get()
            if error is not None:
                raise error
            if item is _END:
                running -= 1
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


_END = object()  # a stream's last item in _merged's queue


async def _all(calls) -> list:
    """Run the calls concurrently, in order; the first failure cancels the rest (which frees their slots in
    the models' batches) and is raised."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        raise
