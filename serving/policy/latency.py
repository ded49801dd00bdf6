"""How long a request would take on one served model, if admitted now:

    predicted_ms = overhead_ms + factor x compute_ms

compute_ms is the time until the request's last step when the work already admitted there (a ledger) and
the request itself are played forward the way the replica serves them: the step engine admits by its own
rule (serving.engine.scheduler.admit_fcfs: FCFS up to its row budget) and every step costs the profile's
forward time at the batch's rows, so a request's time depends on the occupancy over its whole life; the
one-pass batcher runs batches of up to `budget` images one at a time. Forward times come from the
manifest's latency profile; overhead_ms and factor are fitted online from what finished requests really
took (`Correction`), and the safety margin from how wrong the predictions were (`Margin`).

Admitted work enters the ledger at admission and leaves when it finishes, so a burst sees its own earlier
requests and cannot overcommit a replica; between those events the ledger drains at the corrected speed.
Since a step-batched request's rows slow down every step of the requests beside it, a request is admitted
only if it makes none of the admitted ones late. A replica's live state (`LiveState`) adds whatever load
it reports beyond the ledger: requests admitted elsewhere, or work the ledger drained too early.
"""
from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from dataclasses import dataclass, replace

from serving.engine.scheduler import admit_fcfs  # torch-free

_PROBE = -1          # the ticket of the request being predicted
_DONE = 1e-9         # steps left below which work is finished (fractional steps accumulate rounding)


@dataclass
class Work:
    """What one request still needs on a model (or a piece of it: one-pass splits requests across batches)."""

    ticket: int | None     # the policy's id for the request; None for load only the live state knows about
    units: int             # rows per step (iterative) or images (one-pass) still to be served
    steps: float           # steps left; one-pass: 1 (one forward); fractional while mid-step
    arrival: float         # policy clock, seconds, when it reaches the replica
    due: float = math.inf  # policy clock, seconds, by which it should end: its SLO divided by the margin
    running: bool = False  # in the step batch / the forward in flight; running work is a prefix of the list


@dataclass(frozen=True)
class LiveState:
    """One replica's load as it reported it; the ingress fills it from EngineMetrics (rows, running,
    steps_in_flight, queue_length, steps_queued) or the one-pass batcher (a request's steps are 1). Load
    beyond what the ledger holds enters the ledger as anonymous work."""

    at: float                   # policy clock (seconds) when it was read
    running_units: int = 0      # rows in the step batch / images in the forward in flight
    running_requests: int = 0
    running_steps: float = 0.0  # steps the running requests still need, summed over them
    queued_units: int = 0       # rows / images waiting to start
    queued_requests: int = 0
    queued_steps: float = 0.0   # steps the waiting requests need, summed over them
    budget: int | None = None   # the live row / image budget (reconfigure changes it); None: unchanged


class StepTime:
    """ms per forward at any batch size from the profile's points (measured at 1, 2, 4, ... 64): linear
    between them, proportional to the batch beyond the largest, where the per-row cost has flattened."""

    def __init__(self, ms_per_batch: dict[int, float]):
        self.batches = sorted(ms_per_batch)
        self.ms = [ms_per_batch[b] for b in self.batches]

    def __call__(self, units: float) -> float:
        b, ms = self.batches, self.ms
        if units <= b[0]:
            return ms[0]
        if units >= b[-1]:
            return ms[-1] * units / b[-1]
        i = bisect.bisect_left(b, units)  # b[i - 1] < units <= b[i]
        return ms[i - 1] + (ms[i] - ms[i - 1]) * (units - b[i - 1]) / (b[i] - b[i - 1])


def play(work: list[Work], *, iterative: bool, budget: int, step_ms, max_wait_ms: float, origin: float,
         until_ms: float = math.inf) -> dict[int | None, float]:
    """Serve `work` (admission order) from `origin` (policy clock, seconds) as the replica would, until
    `until_ms` after it; step_ms(units) is one forward's time. The list is mutated: finished work leaves,
    the rest keeps its progress. Returns ticket -> when it finished (ms after origin)."""
    def reach(w: Work) -> float:
        return (w.arrival - origin) * 1000

    t, finished = 0.0, {}
    while work:
        if not work[0].running:  # idle until the head arrives; the batcher then waits for batch-mates
            wait = 0.0 if iterative or sum(w.units for w in work) >= budget else max_wait_ms
            t = max(t, reach(work[0]) + wait)
            if t >= until_ms:
                break
        part = _rest_of_step(work)
        if not part and (iterative or not work[0].running):  # the engine admits between steps, the batcher
            _admit(work, iterative, budget, lambda w: reach(w) <= t)  # between batches
        running = [w for w in work if w.running]
        used = sum(w.units for w in running)
        d = step_ms(used)
        k = part or min(w.steps for w in running)  # to the end of the step in flight, or the next finish
        head = next((w for w in work if not w.running), None)
        if iterative and head and reach(head) > t and admit_fcfs(used, (head.units,), budget):
            k = min(k, math.ceil((reach(head) - t) / d))  # or the first step it can join after arriving
        if t + k * d >= until_ms:
            for w in running:
                w.steps -= (until_ms - t) / d
            break
        t += k * d
        for w in running:
            w.steps -= k
            if w.steps <= _DONE:
                finished[w.ticket] = t          # a split request: its last piece's time wins
        work[:] = [w for w in work if w.steps > _DONE]
    return finished


def _rest_of_step(work: list[Work]) -> float:
    """How much of the step in flight is left (0 between steps). Running work joined at step boundaries
    and steps together, so it all shares this fractional part."""
    if not work or not work[0].running:
        return 0.0
    part = work[0].steps - math.floor(work[0].steps + _DONE)
    return part if part > _DONE else 0.0


def _admit(work: list[Work], iterative: bool, budget: int, arrived) -> None:
    """Start waiting work that has arrived. Iterative: the engine's own admission (admit_fcfs) of whole
    requests, which keep their rows to the end. One-pass: images FCFS while they fit, the head split if it
    does not; its rest leads the next batch."""
    k = used = 0
    while k < len(work) and work[k].running:
        used += work[k].units
        k += 1
    if iterative:
        waiting = (w.units for w in itertools.takewhile(arrived, work[k:]))
        for w in work[k:k + admit_fcfs(used, waiting, budget)]:
            w.running = True
        return
    while k < len(work) and used < budget and arrived(work[k]):
        w, room = work[k], budget - used
        if w.units > room:
            work.insert(k, replace(w, units=room, running=True))
            w.units -= room
            return
        w.running = True
        used += w.units
        k += 1


class Correction:
    """actual_ms ~ overhead_ms + factor x compute_ms, for one model, corrected after every finished request.

    `factor` follows the machine's speed and whatever else scales the forwards (the profile was measured
    once, at publish, maybe on another machine); `overhead_ms` is what does not scale: the hops between
    ingress and replica, PNG encoding, per-request work in the replica. Each finished request's residual is
    split between the two in proportion to their shares of its prediction and moved by `alpha` (an EWMA: a
    slowdown is followed within ~1/alpha requests): short requests teach the overhead, long ones the
    factor, and a uniform slowdown scales both by the same ratio. The loop is stable: a factor too small
    drains the ledger too fast, so the next requests' compute comes out too small, their residuals
    positive, and the factor grows."""

    MIN_OVERHEAD_MS = 1.0         # no request crosses Ray faster; at 0 the overhead's share could never grow
    FACTOR_RANGE = (0.1, 10.0)    # beyond it the profile is wrong, not the machine slow: rebuild the store

    def __init__(self, overhead_prior_ms: float, alpha: float):
        self.overhead_ms, self.factor, self.alpha = max(overhead_prior_ms, self.MIN_OVERHEAD_MS), 1.0, alpha

    def predict(self, compute_ms: float) -> float:
        return self.overhead_ms + self.factor * compute_ms

    def observe(self, compute_ms: float, actual_ms: float) -> None:
        """Runs when a request finishes (or expires: its time is then a lower bound, which still pushes
        the right way under a slowdown where nothing finishes in time)."""
        predicted = self.predict(compute_ms)
        # clipped, so that one outlier (a request stuck behind a pause) moves the fit by alpha x 100% at most
        residual = min(max(actual_ms - predicted, -predicted / 2), predicted)
        share = self.overhead_ms / predicted
        self.overhead_ms = max(self.MIN_OVERHEAD_MS, self.overhead_ms + self.alpha * share * residual)
        if compute_ms > 0:
            lo, hi = self.FACTOR_RANGE
            self.factor = min(hi, max(lo, self.factor + self.alpha * (1 - share) * residual / compute_ms))


class Margin:
    """What a prediction is multiplied by before it is held against the deadline: a high quantile of recent
    actual/expected ratios, so it widens after surprises and narrows as predictions improve; never below 1,
    since a pessimistic model is no reason to cut closer.

    It widens at once, but narrows below `prior` only with min_samples ratios as evidence. Two guards keep
    one stall (a cold start, a GC pause, a neighbour on the cores) from locking a model out, which a real
    ramp showed: with few ratios the quantile IS the worst one, and a margin that makes every request
    infeasible admits nothing, so nothing corrects it. A ratio counts at most `max_ratio`, and ratios
    expire after `horizon_s`, after which a quiet model is back at its prior."""

    def __init__(self, prior: float, quantile: float, window: int, min_samples: int, *,
                 max_ratio: float = 4.0, horizon_s: float = 60.0):
        self.prior, self.quantile, self.min_samples = prior, quantile, min_samples
        self.max_ratio, self.horizon_s = max_ratio, horizon_s
        self.ratios: deque[tuple[float, float]] = deque(maxlen=window)   # (time, ratio)
        self._value = prior

    @property
    def value(self) -> float:
        return self._value

    def observe(self, ratio: float, now: float) -> None:
        self.ratios.append((now, min(ratio, self.max_ratio)))
        self.expire(now)

    def expire(self, now: float) -> None:
        """Drop ratios older than the horizon and recompute; runs on every observation and prediction."""
        while self.ratios and self.ratios[0][0] < now - self.horizon_s:
            self.ratios.popleft()
        ordered = sorted(r for _, r in self.ratios)
        q = ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))] if ordered else self.prior
        self._value = max(1.0, q if len(ordered) >= self.min_samples else max(q, self.prior))


@dataclass(frozen=True)
class Projection:
    compute_ms: float      # profile ms from now until the request's last step
    delays_ms: float       # 0, or profile ms until the admitted requests it would make late finish without it
    others_ms: dict[int | None, float]  # ticket -> profile ms from now until held work finishes, with it


class ModelLoad:
    """One served model: its ledger of admitted work, its step-time curve, its correction and margin."""

    def __init__(self, *, iterative: bool, step_time: StepTime, budget: int, max_wait_ms: float,
                 correction: Correction, margin: Margin):
        self.iterative, self.step_time = iterative, step_time
        self.budget, self.max_wait_ms = budget, max_wait_ms
        self.fit, self.margin = correction, margin
        self.work: list[Work] = []        # admitted, unfinished, in admission order (the replica's FCFS)
        self.clock: float | None = None   # the ledger is played forward to this time
        self._version = 0                 # counts ledger changes, for the cache of _finishes
        self._cache: tuple | None = None

    def advance(self, now: float) -> None:
        """Runs before predicting: drain the ledger by the time passed since, at the corrected speed. Work
        the replay finishes leaves even if its finish() has not come yet (the fit and the live state catch
        a replica slower than predicted)."""
        if self.clock is not None and now > self.clock:
            play(self.work, iterative=self.iterative, budget=self.budget, max_wait_ms=self.max_wait_ms,
                 step_ms=lambda u: self.fit.factor * self.step_time(u), origin=self.clock,
                 until_ms=(now - self.clock) * 1000)
        self.clock = now if self.clock is None else max(self.clock, now)

    def project(self, units: int, steps: int, now: float, *, idle: bool = False) -> Projection:
        """A request admitted now behind everything held here (the ledger, plus live load beyond it), or on
        an idle replica: when its last step would be, and whether it would make admitted requests late:
        with continuous batching its rows slow down every step of theirs. Call advance(now) first."""
        held = [] if idle else self.work
        before = self._finishes(now) if held else {}
        after = play([replace(w) for w in held] + [Work(_PROBE, units, steps, self._reaches(now))],
                     iterative=self.iterative, budget=self.budget, step_ms=self.step_time,
                     max_wait_ms=self.max_wait_ms, origin=now)
        delayed = [before[w.ticket] for w in held if w.ticket is not None  # those it delays past their margin
                   and after[w.ticket] > before[w.ticket] + _DONE and after[w.ticket] > self._raw_ms(w.due, now)]
        return Projection(after.pop(_PROBE), max(delayed, default=0.0), after)

    def admit(self, ticket: int, units: int, steps: int, slo_ms: float, margin: float, now: float) -> None:
        self.work.append(Work(ticket, units, steps, self._reaches(now), now + slo_ms / margin / 1000))
        self._version += 1

    def remove(self, ticket: int, now: float) -> None:
        self.advance(now)  # it held its rows until now
        self.work = [w for w in self.work if w.ticket != ticket]
        self._version += 1

    def _raw_ms(self, end: float, now: float) -> float:
        """Profile ms from now until the last step must be done for the request to be back at `end`."""
        return ((end - now) * 1000 - self.fit.overhead_ms) / self.fit.factor

    def _reaches(self, now: float) -> float:
        """When a request sent now reaches the replica: after the ingress's half of the overhead. A step
        engine in full swing makes one that misses a step boundary wait a whole step."""
        return now + self.fit.overhead_ms / 2000

    def _finishes(self, now: float) -> dict[int | None, float]:
        """When the ledger's work finishes without the request being predicted: the same for every
        candidate of this model in one decision, so played once."""
        key = (now, self._version)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, play([replace(w) for w in self.work], iterative=self.iterative, budget=self.budget,
                                     step_ms=self.step_time, max_wait_ms=self.max_wait_ms, origin=now))
        return self._cache[1]

    def observe_live(self, state: LiveState) -> None:
        """Runs when the replica's load was read: the anonymous work of the previous reading is replaced by
        the load this one shows beyond the ledger (played forward to the reading), which then drains with
        the rest, so an old reading fades instead of being counted again."""
        self.advance(state.at)
        if state.budget is not None:
            self.budget = state.budget
        self.work = [w for w in self.work if w.ticket is not None]
        running = [w for w in self.work if w.running]
        queued = [w for w in self.work if not w.running]
        # Only what the totals differ by is missing: where the projection has work running that the
        # replica still queues (or the other way round), nothing is. The missing requests' steps are what
        # the replica's sum exceeds the ledger's by: the ledger usually lacks requests it drained a little
        # early, which are nearly done.
        missing = state.running_units + state.queued_units - sum(w.units for w in self.work)
        missing_running = min(missing, state.running_units - sum(w.units for w in running))
        missing_queued = missing - max(missing_running, 0)
        if missing_running > 0:  # in the same step as the ledger's running work, if any
            part = _rest_of_step(self.work)
            steps = max(round(_steps_each(state.running_steps, state.running_requests, running)), 1)
            self.work.insert(0, Work(None, missing_running, steps - (1 - part if part else 0), state.at,
                                     running=True))
        if missing_queued > 0:
            steps = max(round(_steps_each(state.queued_steps, state.queued_requests, queued)), 1)
            self.work.append(Work(None, missing_queued, steps, state.at))
        self._version += 1


def _steps_each(steps: float, requests: int, known: list[Work]) -> float:
    """Steps each request the ledger lacks still needs: the replica's sum beyond the ledger's, per request."""
    tickets = {w.ticket for w in known}
    return max(steps - sum(w.steps for w in known), 0.0) / max(requests - len(tickets), 1)
