"""Errors a model replica raises on purpose, for the ingress to map to each API's status by type.

Torch-free, so the ingress (which never imports the engine or torch) can catch them: Ray re-raises a
replica's exception at the caller as a RayTaskError that is also an instance of the original class."""
from __future__ import annotations


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
