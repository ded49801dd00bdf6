"""The step-batched engine in Prometheus, from the iterative replica (serving/app.py), without the engine
knowing: a task that copies its gauges out, and a Stepper wrapper that sees when each request's first
forward starts, which splits its time in the replica into queue and compute."""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING

from serving.observability.metrics import record_engine, record_request_times

if TYPE_CHECKING:
    import torch

    from serving.engine import AsyncEngine, EngineMetrics, Request, StepPlan, Stepper
    from serving.engine.request import RequestOutput, RequestState

# Well under Ray's export interval (>= 1 s), whose gauges lapse after two intervals without a value.
EXPORT_PERIOD_S = 0.5


async def export_engine_metrics(model: str, metrics: EngineMetrics) -> None:
    """Runs for the replica's life as a task on its event loop: the engine's gauges and step count."""
    steps = 0
    while True:
        steps = record_engine(model, metrics, steps)
        await asyncio.sleep(EXPORT_PERIOD_S)


class StepTiming:
    """A Stepper that runs another and notes when each request's first forward begins. stream() is
    AsyncEngine.stream, recording each served request's queue and compute time."""

    def __init__(self, stepper: Stepper, model: str):
        self.stepper, self.model = stepper, model
        # id of a request submit() awaits -> perf_counter() at its first forward (None before it); set on the
        # engine's thread, added and popped on the event loop
        self._first_forward: dict[str, float | None] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()

    def execute(self, plan: StepPlan) -> torch.Tensor:
        now = time.perf_counter()
        with self._lock:
            for request_id in plan.joined:
                # not one another engine core runs over this stepper, nor one resuming after a pre-emption
                if request_id in self._first_forward and self._first_forward[request_id] is None:
                    self._first_forward[request_id] = now
        return self.stepper.execute(plan)

    def update(self, plan: StepPlan, out: torch.Tensor) -> None:
        self.stepper.update(plan, out)

    def images(self, state: RequestState) -> torch.Tensor:
        return self.stepper.images(state)

    def preview(self, state: RequestState) -> torch.Tensor:
        return self.stepper.preview(state)

    async def stream(self, engine: AsyncEngine, request: Request) -> AsyncIterator[RequestOutput]:
        """AsyncEngine.stream, recording a served request's queue and compute time when it finishes."""
        request_id = f"timed-{next(self._ids)}"
        start = time.perf_counter()
        self._first_forward[request_id] = None
        try:
            async with aclosing(engine.stream(request, request_id)) as outputs:
                async for output in outputs:
                    if output.finished:
                        first = self._first_forward.get(request_id)
                        if first is not None:
                            record_request_times(self.model, first - start, time.perf_counter() - first)
                    yield output
        finally:
            with self._lock:
                self._first_forward.pop(request_id)
