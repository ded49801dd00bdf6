"""The engine core: one family's step loop, synchronous and thread-safe. Each step is

    plan = scheduler.schedule(now)   # drop cancelled/expired, admit waiting: CPU bookkeeping
    out  = stepper.execute(plan)     # ONE forward over the whole batch
    stepper.update(plan, out)        # each request's own sampler / pixel step
    scheduler.update(plan)           # count the step, free finished requests

Tests drive step() directly with a fake runner; AsyncEngine drives it from asyncio.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

import torch

from serving.engine.metrics import EngineMetrics
from serving.engine.request import (DeadlineExceeded, Request, RequestCancelled, RequestFailed, RequestOutput,
                                    RequestState, Status, make_state)
from serving.engine.scheduler import Scheduler, StepPlan
from serving.errors import EngineOverloaded

DEFAULT_MAX_ROWS = 64  # rows per forward; the replica's config sets it from the latency profile


class Stepper(Protocol):
    """One family's work around the forward pass (DiffusionStepper, PixelCNNStepper)."""

    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Runs once per step with a non-empty plan, on the engine's thread: ONE runner forward."""
        ...

    def update(self, plan: StepPlan, out: torch.Tensor) -> None:
        """Runs right after execute: advance every planned request's tensors by one step."""
        ...

    def images(self, state: RequestState) -> torch.Tensor:
        """Runs once per finished request: its images, uint8 [n, 1, 28, 28]."""
        ...

    def preview(self, state: RequestState) -> torch.Tensor:
        """Runs after update for a request that reached one of its preview points (state.preview_at): what its
        images look like so far, uint8 [n, 1, 28, 28]."""
        ...


class EngineCore:
    """add_request / abort_request from any thread at any time; step() from one thread in a loop.
    A lock guards the scheduler's bookkeeping, never the forward, so adding never waits for a step."""

    def __init__(self, stepper: Stepper, *, max_rows: int = DEFAULT_MAX_ROWS, max_waiting_rows: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stepper = stepper
        self.clock = clock  # deadlines are on this clock; tests pass a fake one
        self.scheduler = Scheduler(max_rows, max_waiting_rows)
        self.metrics = EngineMetrics(max_rows=max_rows)
        self._lock = threading.Lock()
        self._next_id = 0
        self._step_s: float | None = None  # the last forward's time on `clock`: what pre-emption plans with

    def add_request(self, request: Request, request_id: str | None = None) -> str:
        """Queue a validated request; it joins the batch at the next step with room. Returns its id.
        Raises ValueError for a duplicate id or a request wider than max_rows, EngineOverloaded when the
        waiting queue is at max_waiting_rows."""
        with self._lock:
            if request_id is None:
                request_id, self._next_id = f"req-{self._next_id}", self._next_id + 1
        state = make_state(request_id, request, self.clock())  # draws x_T: outside the lock
        with self._lock:
            try:
                self.scheduler.add(state)
            except EngineOverloaded:
                self.metrics.refused += 1
                raise
            self.metrics.added += 1
        return request_id

    def abort_request(self, request_id: str) -> None:
        """Cancel: the request leaves the batch at the next step and its output says CANCELLED."""
        with self._lock:
            self.scheduler.abort(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.scheduler.running or self.scheduler.waiting)

    def set_limits(self, max_rows: int, max_waiting_rows: int | None) -> None:
        """Live reconfigure: the new budget applies from the next admission, the new queue bound from the
        next request added."""
        with self._lock:
            self.scheduler.max_rows = max_rows
            self.scheduler.max_waiting_rows = max_waiting_rows

    def step(self) -> list[RequestOutput]:
        """One engine iteration. Returns the requests that ended during it: dropped before the forward
        (cancelled, expired), finished by it, or failed with it (the exception goes to every request
        in the batch, and the engine carries on with the next step); and the previews it made (RUNNING)."""
        with self._lock:
            plan = self.scheduler.schedule(self.clock(), self._step_s)
            self.metrics.preempted += len(plan.preempted)
        outputs = [self._output(s) for s in plan.dropped]
        if plan.requests:
            start, started = time.perf_counter(), self.clock()
            try:
                out = self.stepper.execute(plan)
                self.stepper.update(plan, out)
            except Exception as exc:
                with self._lock:
                    failed = self.scheduler.fail(plan)
                outputs += [self._output(s, cause=exc) for s in failed]
            else:
                with self._lock:
                    finished = self.scheduler.update(plan)
                outputs += [self._output(s) for s in finished] + self._previews(plan)
            self.metrics.record_step(plan.num_rows, time.perf_counter() - start, plan.max_rows)
            self._step_s = (self.clock() - started) or None
        with self._lock:
            self.metrics.record_load(self.scheduler.running, list(self.scheduler.waiting))
        for output in outputs:
            if output.finished:
                self.metrics.record_end(output.status)
        return outputs

    def _previews(self, plan: StepPlan) -> list[RequestOutput]:
        """The planned requests still running that this step brought to a preview point. A preview is a copy
        of a few images (x̂₀ was computed in the update): the step loop never waits on its encoding."""
        previews = []
        for s in plan.requests:
            if s.status is Status.RUNNING and s.steps_done in s.preview_at:
                previews.append(RequestOutput(s.request_id, Status.RUNNING, self.stepper.preview(s),
                                              preview_index=s.previews_taken, step=s.steps_done))
                s.previews_taken += 1
        self.metrics.previews += len(previews)
        return previews

    def _output(self, state: RequestState, cause: Exception | None = None) -> RequestOutput:
        args = (state.request_id, state.steps_done, state.steps_total)
        if state.status is Status.FINISHED:
            return RequestOutput(state.request_id, state.status, self.stepper.images(state), step=state.steps_done)
        if state.status is Status.CANCELLED:
            error = RequestCancelled(*args, "was cancelled")
        elif state.status is Status.EXPIRED:
            late_ms = (self.clock() - state.deadline) * 1000
            error = DeadlineExceeded(*args, f"missed its deadline (now {late_ms:.0f} ms past it)")
        else:
            error = RequestFailed(*args, f"failed: {type(cause).__name__}: {cause}")
            error.__cause__ = cause
        return RequestOutput(state.request_id, state.status, None, error)
