"""The ingress deployment: every public protocol in, validated GenerationJobs out to the model deployments.
Each HTTP protocol's routes are a router included in the shared FastAPI app (serving/api/http.py); this
class holds what they share: the model handles and the one call to a model, bounded by the request's deadline, with
the model's failures mapped to API errors (serving.api.openai.APIError, which each protocol renders in
its own shape).

Imports no runtime and no torch: the model deployments hold the sessions and the engine."""
import asyncio
from typing import Any

from ray import serve
from ray.serve.exceptions import BackPressureError, RequestCancelledError
from ray.serve.handle import DeploymentHandle

from serving.api.http import api, logger
from serving.api.jobs import GenerationJob, GenerationResult, ImagesJob, InterpolationJob
from serving.api.openai import APIError
from serving.api import family_routes, kserve_http, openai_routes, playground
from serving.api.kserve import OpenInference
from serving.api.kserve_grpc import GRPCInferenceService
from serving.observability import note_model, observe_model_call

# Errors a model deployment raises on purpose, by class name: the iterative engine's live in serving.engine,
# which imports torch, and the ingress stays torch-free.
_REQUEST_ERRORS = {"DeadlineExceeded": (504, "timeout_error", "deadline_exceeded"),
                   "RequestCancelled": (503, "server_error", "request_cancelled"),
                   "EngineStopped": (503, "server_error", "engine_stopped")}

api.include_router(openai_routes.router)
api.include_router(family_routes.router)
api.include_router(playground.router)
api.include_router(kserve_http.router)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(api)
class Ingress(GRPCInferenceService):  # gRPC: Serve's proxy calls the method named after the RPC
    def __init__(self, models: dict[str, DeploymentHandle], families: dict[str, str], default_model: str,
                 timeout_s: float):
        """models: name -> handle of its deployment; families: name -> family (from the store at build)."""
        self.models, self.families = models, families
        self.default_model, self.timeout_s = default_model, timeout_s
        self.v2 = OpenInference(self)  # KServe v2's operations, for its HTTP routes and gRPC methods

    async def generate_with(self, model: str, job: GenerationJob) -> GenerationResult:
        """One call to the model's deployment, bounded by the job's SLO (else the ingress timeout); its
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
        note_model(model)  # the request's model label
        timeout = getattr(job, "timeout_s", None) or self.timeout_s
        response = getattr(self.models[model], method).remote(job)
        try:
            return await asyncio.wait_for(response, timeout)  # a DeploymentResponse is awaitable
        except asyncio.CancelledError:  # the caller gave up (e.g. a sibling call failed): so does the model
            response.cancel()
            raise
        except TimeoutError:
            response.cancel()  # the job leaves the model's queue (or the engine's batch) too
            raise APIError(504, f"{model} did not answer within {timeout * 1000:.0f} ms", type="timeout_error",
                           code="deadline_exceeded") from None
        except BackPressureError:
            raise APIError(503, f"{model} is at capacity; retry shortly", type="server_error",
                           code="overloaded") from None
        except RequestCancelledError:
            raise APIError(503, f"the request to {model} was cancelled", type="server_error",
                           code="request_cancelled") from None
        except Exception as exc:
            cause = getattr(exc, "cause", None) or exc  # a RayTaskError carries the replica's exception
            if type(cause).__name__ in _REQUEST_ERRORS:
                status, kind, code = _REQUEST_ERRORS[type(cause).__name__]
                raise APIError(status, str(cause), type=kind, code=code) from None
            if isinstance(cause, ValueError):  # a check the deployment makes (the API checks first)
                raise APIError(400, str(cause)) from None
            logger.exception("genserve ingress: %s failed", model)
            raise APIError(500, f"{model} failed: {type(cause).__name__}: {cause}", type="server_error",
                           code="model_error") from None
