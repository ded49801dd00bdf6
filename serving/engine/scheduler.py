"""The step scheduler: CPU bookkeeping only. Before each forward it drops requests that were cancelled
or whose deadline passed, admits waiting ones FCFS up to the row budget, and, when the head of the queue
does not fit, pre-empts long running requests that can afford to wait for it; after it, it counts the
step and frees finished requests. It never touches tensors or the model, and imports no torch: the
policy's simulator runs this Scheduler on a simulated clock, and its latency model admits with
`admit_fcfs`, the one admission rule of the engine."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from serving.engine.state import RequestState, Status
from serving.errors import EngineOverloaded


@dataclass
class StepPlan:
    """What one engine step runs: the scheduler's output, read by the stepper and by metrics."""

    requests: list[RequestState]                                # stepped this iteration, in batch order
    joined: list[str] = field(default_factory=list)            # ids admitted at this step (first forward)
    dropped: list[RequestState] = field(default_factory=list)  # cancelled/expired since the last step
    num_rows: int = 0                                           # forward rows: sum of requests' rows
    max_rows: int = 0                                           # the row budget this plan was made under
    num_waiting: int = 0                                        # queue length after admission
    preempted: list[str] = field(default_factory=list)         # ids paused at this step, back in the queue


class Scheduler:
    """FCFS with a row budget, and pre-emption at step boundaries. A request takes `state.rows` rows for its
    whole life (n, or 2n when guided), so the batch size of every forward is known at admission.

    Pre-emption (vLLM's priority scheduling, for a batch whose requests differ 5x in length): when the queue's
    head does not fit, running requests with more steps left than it are paused, longest first, until it
    fits, but only those whose deadline survives waiting for it (its steps, at the last step's time, x
    PREEMPT_SLACK). A paused request keeps its state (a diffusion x_t, the pixels so far) and goes back into
    the queue right behind the head, so it resumes, not restarts, as soon as there is room: nothing is
    recomputed. Without it, a 10-step request arriving at a full batch of 50-step ones waits for one of them
    to finish."""

    def __init__(self, max_rows: int, max_waiting_rows: int | None = None):
        self.max_rows = max_rows
        self.max_waiting_rows = max_waiting_rows      # None: the waiting queue is unbounded
        self.waiting: deque[RequestState] = deque()   # arrival order
        self.running: list[RequestState] = []         # admission order = batch order
        self.requests: dict[str, RequestState] = {}   # request_id -> state, until it leaves

    @property
    def max_rows(self) -> int:
        return self._max_rows

    @max_rows.setter
    def max_rows(self, value: int) -> None:
        """Changeable live (Ray Serve reconfigure); a lower budget only slows admission, running requests stay."""
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"max_rows must be an integer >= 1, got {value!r}")
        self._max_rows = value

    @property
    def max_waiting_rows(self) -> int | None:
        return self._max_waiting_rows

    @max_waiting_rows.setter
    def max_waiting_rows(self, value: int | None) -> None:
        """Changeable live too; a lower bound refuses new requests only, those already waiting stay."""
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"max_waiting_rows must be an integer >= 1 or None, got {value!r}")
        self._max_waiting_rows = value

    def add(self, state: RequestState) -> None:
        """Runs when a request arrives: queue it; it joins at the next step with room. Raises EngineOverloaded
        when the rows already waiting leave no room for it under max_waiting_rows (an empty queue always takes
        one request, so a bound below a request's rows slows it, never starves it)."""
        if state.request_id in self.requests:
            raise ValueError(f"request id {state.request_id!r} is already in the engine")
        if state.rows > self.max_rows:
            raise ValueError(f"request {state.request_id} needs {state.rows} rows per step "
                             f"(n={state.n}, x2 when guided) but max_rows is {self.max_rows}; split it")
        if self.max_waiting_rows is not None and self.waiting:
            waiting_rows = sum(s.rows for s in self.waiting)
            if waiting_rows + state.rows > self.max_waiting_rows:
                raise EngineOverloaded(state.rows, waiting_rows, self.max_waiting_rows)
        state.status = Status.WAITING
        self.waiting.append(state)
        self.requests[state.request_id] = state

    def abort(self, request_id: str) -> None:
        """Runs when a client cancels: the request leaves at the next schedule(). Ids that already left
        are ignored, since a request may finish while its cancellation is on the way."""
        if (state := self.requests.get(request_id)) is not None:
            state.cancel_requested = True

    def schedule(self, now: float, step_s: float | None = None) -> StepPlan:
        """Runs at the start of every step, `now` on the engine's clock: drop cancelled and expired
        requests (running or waiting), admit waiting ones by `admit_fcfs`, and pre-empt for the head of the
        queue if it still waits (`step_s`: the last step's seconds; None: no pre-emption)."""
        dropped = []
        for state in (*self.running, *self.waiting):
            if (why := _drop_status(state, now)) is not None:
                state.status = why
                dropped.append(state)
        if dropped:
            self._forget(dropped)
            self.running = [s for s in self.running if s.status is Status.RUNNING]
            self.waiting = deque(s for s in self.waiting if s.status is Status.WAITING)

        preempted = self._preempt(now, step_s) if step_s else []
        num_rows = sum(s.rows for s in self.running)
        joined = []
        for _ in range(admit_fcfs(num_rows, (s.rows for s in self.waiting), self.max_rows)):
            state = self.waiting.popleft()
            state.status = Status.RUNNING
            self.running.append(state)
            num_rows += state.rows
            joined.append(state.request_id)
        return StepPlan(list(self.running), joined, dropped, num_rows, self.max_rows, len(self.waiting), preempted)

    def _preempt(self, now: float, step_s: float) -> list[str]:
        """Pause running requests for the queue's head when it does not fit (see the class docstring); the
        paused go back into the queue right behind it, fewest steps left first. Returns their ids."""
        if not self.waiting:
            return []
        head = self.waiting[0]
        free = self.max_rows - sum(s.rows for s in self.running)
        if head.rows <= free:
            return []  # it joins by admit_fcfs
        wait_s = head.remaining * step_s
        longer = sorted((s for s in self.running if s.remaining > head.remaining
                         and (s.deadline is None or now + (s.remaining * step_s + wait_s) * PREEMPT_SLACK < s.deadline)),
                        key=lambda s: -s.remaining)
        paused = []
        for state in longer:
            if free >= head.rows:
                break
            paused.append(state)
            free += state.rows
        if free < head.rows:
            return []  # pausing every candidate would still not make room: pause none
        self.running = [s for s in self.running if s not in paused]
        for state in paused:  # longest first, each in front of the last: the shortest resumes first
            state.status = Status.WAITING
            self.waiting.insert(1, state)
        return [s.request_id for s in paused]

    def update(self, plan: StepPlan) -> list[RequestState]:
        """Runs after the stepper applied the forward's output: count one step for every planned
        request and free the finished ones, whose rows the next schedule() can give away."""
        finished = []
        for state in plan.requests:
            state.steps_done += 1
            if state.done:
                state.status = Status.FINISHED
                finished.append(state)
        if finished:
            self._forget(finished)
            self.running = [s for s in self.running if s.status is Status.RUNNING]
        return finished

    def fail(self, plan: StepPlan) -> list[RequestState]:
        """Runs when the step raised: every planned request leaves as FAILED (its state may be half-updated)."""
        for state in plan.requests:
            state.status = Status.FAILED
        self._forget(plan.requests)
        self.running = [s for s in self.running if s.status is Status.RUNNING]
        return plan.requests

    def _forget(self, states: list[RequestState]) -> None:
        for state in states:
            del self.requests[state.request_id]


# A paused request's deadline must hold with this factor on the wait and on its own remaining steps: a step's
# time varies with the batch, and a pre-emption that makes its victim late only moves the miss
PREEMPT_SLACK = 1.5


def admit_fcfs(running_rows: int, waiting_rows: Iterable[int], max_rows: int) -> int:
    """How many of the waiting requests (their rows, in arrival order) join a batch of `running_rows` at
    a step boundary. Runs in Scheduler.schedule before every step, and wherever the policy replays a
    replica's engine (serving/policy/latency.py). Strict FCFS: a request that does not fit blocks those
    behind it, so a large request is never starved by small ones; an empty batch always takes the head,
    which after a live max_rows cut may not fit any more."""
    joining = 0
    for rows in waiting_rows:
        if running_rows and running_rows + rows > max_rows:
            break
        running_rows += rows
        joining += 1
    return joining


def _drop_status(state: RequestState, now: float) -> Status | None:
    """Why a request must leave before this step, if it must: cancellation wins over expiry."""
    if state.cancel_requested:
        return Status.CANCELLED
    if state.deadline is not None and now >= state.deadline:
        return Status.EXPIRED
    return None
