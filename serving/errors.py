"""Errors a model replica raises on purpose, for the ingress to map to each API's status by type.

Torch-free, so the ingress (which never imports the engine or torch) can catch them: Ray re-raises a
replica's exception at the caller as a RayTaskError that is also an instance of the original class."""
from __future__ import annotations

import functools
import inspect
import re


class RequestAborted(Exception):
    """A request left the step engine without images; its waiter gets a subclass."""

    def __init__(self, request_id: str, steps_done: int, steps_total: int, why: str):
        super().__init__(request_id, steps_done, steps_total, why)  # args pickle it back to the ingress whole
        self.request_id, self.steps_done, self.steps_total, self.why = request_id, steps_done, steps_total, why

    def __str__(self) -> str:
        return f"request {self.request_id} {self.why} after {self.steps_done} of {self.steps_total} steps"


class RequestCancelled(RequestAborted):
    """Its client cancelled it (or went away)."""


class DeadlineExceeded(RequestAborted):
    """Its deadline passed before it finished."""


class RequestFailed(RequestAborted):
    """The step it was in raised; the cause is chained (__cause__)."""


class EngineStopped(RuntimeError):
    """The engine loop ended while the request was still in it."""


class EngineOverloaded(RuntimeError):
    """The step engine's waiting queue is at its bound (IterativeConfig.max_waiting_rows): refused at once,
    so the client backs off instead of queueing past any deadline (HTTP 503 + Retry-After, gRPC
    RESOURCE_EXHAUSTED)."""

    def __init__(self, rows: int, waiting_rows: int, max_waiting_rows: int):
        super().__init__(rows, waiting_rows, max_waiting_rows)
        self.rows, self.waiting_rows, self.max_waiting_rows = rows, waiting_rows, max_waiting_rows

    def __str__(self) -> str:
        return (f"the engine's queue is full ({self.waiting_rows} rows waiting, bound {self.max_waiting_rows}; "
                f"this request needs {self.rows}); retry shortly")


class ModelUnavailable(RuntimeError):
    """The replica could not load its model (a tampered or missing artifact, a session that would not open).
    It stays up and answers every call with this, rather than failing its constructor, which Serve would
    retry and then mark the whole application DEPLOY_FAILED: so the other models keep serving, the ingress
    answers this one's requests at once (HTTP 503), and readiness and metrics name it with the reason."""

    def __init__(self, model: str, reason: str):
        super().__init__(model, reason)
        self.model, self.reason = model, reason

    @classmethod
    def of(cls, model: str, cause: BaseException) -> ModelUnavailable:
        """From the load's exception; the reason keeps its type and message, without host paths or URIs
        (it is answered to clients)."""
        return cls(model, f"{type(cause).__name__}: {_PATH.sub('<store>', str(cause))}")

    def __str__(self) -> str:
        return f"model {self.model} is not available: it failed to load ({self.reason})"


_PATH = re.compile(r"(?:\b[a-z][a-z0-9+.-]*://|(?<![\w.])/)[^\s;,'\"()]+")  # file:///..., s3://..., /abs/path


def unless_unavailable(method):
    """Decorate a model replica's async method: when the replica's model failed to load (`self.load_error`,
    a ModelUnavailable), raise it instead of running."""
    if inspect.isasyncgenfunction(method):  # a streaming method: raise on the first item
        @functools.wraps(method)
        async def stream(self, *args, **kwargs):
            if self.load_error is not None:
                raise ModelUnavailable(self.load_error.model, self.load_error.reason)
            async for item in method(self, *args, **kwargs):
                yield item
        return stream

    @functools.wraps(method)
    async def call(self, *args, **kwargs):
        if self.load_error is not None:
            raise ModelUnavailable(self.load_error.model, self.load_error.reason)  # fresh: no traceback pile-up
        return await method(self, *args, **kwargs)
    return call
