"""Engine metrics: plain attributes, written by the engine at the end of every step and read by the
policy and the Prometheus exporter. One writer; readers may see values one step stale, so no lock."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from serving.engine.request import RequestState, Status

RATE_WINDOW = 50  # steps the rates average over: long enough to smooth jitter, short enough to follow load


@dataclass
class EngineMetrics:
    # gauges, as of the last step
    max_rows: int = 0                   # the row budget
    rows: int = 0                       # rows in the last forward
    batch_occupancy: float = 0.0        # rows / max_rows of the last forward
    queue_length: int = 0               # requests waiting for room
    rows_queued: int = 0                # rows those requests will take
    running: int = 0                    # requests in the batch
    steps_in_flight: int = 0            # steps the running requests still need
    steps_queued: int = 0               # steps the waiting requests will need
    # rates over the last RATE_WINDOW steps, in time spent stepping (idle time excluded)
    steps_per_second: float = 0.0       # engine steps = forwards
    row_steps_per_second: float = 0.0   # rows x steps: comparable with the runner's raw throughput
    last_step_s: float = 0.0
    # counters since start
    steps: int = 0
    row_steps: int = 0
    added: int = 0
    refused: int = 0                    # turned away: the waiting queue was at max_waiting_rows
    preempted: int = 0                  # pauses of a running request for a shorter one (Scheduler)
    previews: int = 0                   # partial images streamed (RequestOutput with status RUNNING)
    finished: int = 0
    cancelled: int = 0
    expired: int = 0
    failed: int = 0
    _window: deque = field(default_factory=lambda: deque(maxlen=RATE_WINDOW), repr=False)  # (seconds, rows)

    def record_step(self, rows: int, seconds: float, max_rows: int) -> None:
        """Runs after each step that ran a forward."""
        self.steps += 1
        self.row_steps += rows
        self.rows, self.max_rows, self.last_step_s = rows, max_rows, seconds
        self.batch_occupancy = rows / max_rows
        self._window.append((seconds, rows))
        busy = sum(s for s, _ in self._window)
        if busy > 0:
            self.steps_per_second = len(self._window) / busy
            self.row_steps_per_second = sum(r for _, r in self._window) / busy

    def record_load(self, running: list[RequestState], waiting: list[RequestState]) -> None:
        """Runs at the end of every step, after finished requests were freed."""
        self.running, self.queue_length = len(running), len(waiting)
        self.steps_in_flight = sum(s.steps_total - s.steps_done for s in running)
        self.steps_queued = sum(s.remaining for s in waiting)  # a pre-empted request has done some
        self.rows_queued = sum(s.rows for s in waiting)
        if not running:
            self.rows, self.batch_occupancy = 0, 0.0

    def record_end(self, status: Status) -> None:
        """Runs once per request that left the engine."""
        name = {Status.FINISHED: "finished", Status.CANCELLED: "cancelled", Status.EXPIRED: "expired",
                Status.FAILED: "failed"}[status]
        setattr(self, name, getattr(self, name) + 1)
