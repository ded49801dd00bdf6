"""When each request is sent and what it asks for, fixed up front from the scenario's seed.

The open loop's whole send schedule is computed before the first request, so a slow server cannot delay
the next send (no coordinated omission): the runner sends each request at its intended time, and latency
is measured from that time. Two independent random streams, one for arrival gaps and one for the mix, so
the same seed gives the same sequence of requests whatever the arrival process."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from loadtests.scenario import ClosedLoop, OpenLoop, Scenario

_ARRIVALS, _DRAWS = 0, 1   # the two streams' keys under the scenario seed


@dataclass(frozen=True)
class Send:
    at: float           # intended send time, seconds after the run's start
    stage: int          # index into the load's stages (warm-up runs at stage 0's load)
    template: int       # index into the scenario's mix
    seed: int           # the request's image seed
    warmup: bool        # sent during warm-up: recorded, left out of the stats


@dataclass(frozen=True)
class Window:
    """A stage's measured stretch of the run (warm-up excluded): what throughput is computed over."""

    stage: int
    start: float        # seconds after the run's start
    end: float
    offered_rate: float | None   # req/s; None for a closed loop, whose offered load is what it achieves


class Draws:
    """The mix draws: the template and the image seed of each next request, in a fixed order."""

    def __init__(self, scenario: Scenario):
        weights = np.array([t.weight for t in scenario.mix], dtype=float)
        self._p = weights / weights.sum()
        self._rng = np.random.default_rng([scenario.seed, _DRAWS])

    def next(self) -> tuple[int, int]:
        return int(self._rng.choice(len(self._p), p=self._p)), int(self._rng.integers(2**32))


def stage_windows(scenario: Scenario) -> list[Window]:
    """The measured windows: one per open-loop stage, one for a closed loop."""
    if isinstance(scenario.load, ClosedLoop):
        return [Window(0, scenario.warmup_s, scenario.duration_s, None)]
    windows, start = [], scenario.warmup_s
    for i, stage in enumerate(scenario.load.stages):
        windows.append(Window(i, start, start + stage.duration_s, stage.rate))
        start += stage.duration_s
    return windows


def arrival_times(arrival: str, rate: float, start: float, end: float, rng: np.random.Generator) -> list[float]:
    """Send times in [start, end) at `rate` req/s: exponential gaps (Poisson) or even ones (constant)."""
    if rate == 0:
        return []
    if arrival == "constant":
        return [start + k / rate for k in range(math.ceil((end - start) * rate - 1e-9))]
    times, t = [], start + rng.exponential(1 / rate)
    while t < end:
        times.append(t)
        t += rng.exponential(1 / rate)   # memoryless: restarting the gap at a stage boundary changes nothing
    return times


def open_loop_schedule(scenario: Scenario) -> list[Send]:
    """Every send of an open-loop scenario, in time order, cut at max_requests (warm-up included)."""
    load = scenario.load
    if not isinstance(load, OpenLoop):
        raise ValueError(f"scenario {scenario.name}: a closed loop has no send schedule; its users send on answers")
    rng, draws = np.random.default_rng([scenario.seed, _ARRIVALS]), Draws(scenario)
    stretches = [(0, 0.0, scenario.warmup_s, load.stages[0].rate, True)] if scenario.warmup_s else []
    stretches += [(w.stage, w.start, w.end, w.offered_rate, False) for w in stage_windows(scenario)]
    sends = []
    for stage, start, end, rate, warmup in stretches:
        for at in arrival_times(load.arrival, rate, start, end, rng):
            if len(sends) == scenario.max_requests:
                return sends
            template, seed = draws.next()
            sends.append(Send(at, stage, template, seed, warmup))
    return sends
