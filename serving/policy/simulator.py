"""A discrete-event simulation of genserve's serving path, for policy experiments and unit tests without Ray.

Requests arrive, the policy decides; admitted ones reach a model of their replica after half the hop time:
the one-pass batcher (serving/onepass/batcher.py: batches of up to `budget` images, the first waiting
max_wait_ms for batch-mates) or the step engine (the engine's own Scheduler, serving/engine/scheduler.py, on
the simulated clock: FCFS up to the row budget, one forward per step over every running request). Every
forward takes the profile's time x `slowdown` x lognormal noise: the truth the policy's latency model has to
track. A request still running at its deadline is expired, as the ingress's timeout and the engine's
deadline do, and leaves the batch at the next step. Ends go back to the policy through finish(), and the
replicas' load through observe_live() every `live_every_s`, as the ingress will do.

    python -m serving.policy.simulator --help
"""
from __future__ import annotations

import argparse
import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from core.settings import SamplingSetting
from model_store.manifest import LatencyProfile, Manifest, SamplingSettings
from serving.engine.scheduler import Scheduler, StepPlan  # torch-free
from serving.engine.state import RequestState
from serving.policy.latency import LiveState
from serving.policy.policy import AUTO, Decision, Hints, Outcome, Policy, PolicyConfig, Rejection, ServedModel


@dataclass(frozen=True)
class SimConfig:
    slowdown: float = 1.0               # true forward time = profile x slowdown x noise
    noise: float = 0.05                 # sigma of the lognormal noise on every forward and hop
    overhead_ms: float = 3.0            # ingress <-> replica per request (Ray hops, PNG), half each way
    live_every_s: float | None = 0.1    # replica load to the policy this often; None: the ledger alone
    seed: int = 0


@dataclass
class Result:
    """One request's fate."""

    arrival: float                      # seconds
    hints: Hints
    outcome: Decision | Rejection
    latency_ms: float | None = None     # at the ingress; the SLO when it expired; None when rejected
    status: Outcome | None = None       # OK or EXPIRED once ended; None when rejected

    @property
    def admitted(self) -> bool:
        return isinstance(self.outcome, Decision)

    @property
    def met(self) -> bool:
        return self.status is Outcome.OK and self.latency_ms <= self.outcome.slo_ms


@dataclass(eq=False)
class _Request:
    result: Result | None               # None in tests that drive a replica alone
    request_id: str                     # the policy's ticket
    n: int                              # images
    units: int                          # rows per step / images
    steps: int
    reached: float = 0.0                # when it reached the replica
    images_done: int = 0                # one-pass: images whose forward finished
    gone: bool = False                  # ended at the ingress (expired): the replica drops it


class _Clock:
    """The event queue: callbacks at times, FIFO among equal times."""

    def __init__(self):
        self.now = 0.0
        self._events: list = []
        self._seq = itertools.count()

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn))

    def pending(self) -> bool:
        return bool(self._events)

    def run(self) -> None:
        while self._events:
            self.now, _, fn = heapq.heappop(self._events)
            fn()


class _Engine:
    """The step engine: the engine's own Scheduler (serving/engine/scheduler.py) on the simulated clock,
    driven as EngineCore.step drives it (schedule, one forward of forward_ms(rows), update) whenever it has
    work. Expired requests are aborted, so they leave before the next step."""

    def __init__(self, clock: _Clock, forward_ms: Callable[[int], float], budget: int, done: Callable):
        self.clock, self.forward_ms, self.done = clock, forward_ms, done
        self.scheduler = Scheduler(budget)
        self.requests: dict[str, _Request] = {}   # request_id -> request, while the scheduler holds it
        self.busy = False                         # a step is in flight
        self.last_step_s: float | None = None     # the last forward's time, as EngineCore's metrics keep it

    def add(self, r: _Request) -> None:
        """Runs when a request reaches the replica; an idle engine steps at once."""
        if r.gone:  # expired on its way
            return
        self.requests[r.request_id] = r
        self.scheduler.add(RequestState(r.request_id, r.n, r.units, r.steps, arrival=self.clock.now))
        if not self.busy:
            self._step()

    def abort(self, r: _Request) -> None:
        """Runs when the ingress gave up on a request (ignored once it left)."""
        self.scheduler.abort(r.request_id)

    def _step(self) -> None:
        plan = self.scheduler.schedule(self.clock.now, self.last_step_s)
        for state in plan.dropped:
            del self.requests[state.request_id]
        self.busy = bool(plan.requests)
        if self.busy:
            self.last_step_s = self.forward_ms(plan.num_rows) / 1000
            self.clock.at(self.clock.now + self.last_step_s, lambda: self._stepped(plan))

    def _stepped(self, plan: StepPlan) -> None:
        for state in self.scheduler.update(plan):
            r = self.requests.pop(state.request_id)
            if not r.gone:
                self.done(r)
        self._step()

    def live(self, now: float) -> LiveState:
        run = [s for s in self.scheduler.running if not s.cancel_requested]
        wait = [s for s in self.scheduler.waiting if not s.cancel_requested]
        return LiveState(now, running_units=sum(s.rows for s in run), running_requests=len(run),
                         running_steps=sum(s.steps_total - s.steps_done for s in run),
                         queued_units=sum(s.rows for s in wait), queued_requests=len(wait),
                         queued_steps=sum(s.remaining for s in wait))


class _Batcher:
    """The one-pass batcher: one batch in flight; the next takes up to `budget` images FCFS (splitting a
    request) once the queue holds `budget` images or its oldest request has waited max_wait_ms."""

    def __init__(self, clock: _Clock, forward_ms: Callable[[int], float], budget: int, max_wait_ms: float,
                 done: Callable):
        self.clock, self.forward_ms, self.budget, self.max_wait_ms, self.done = \
            clock, forward_ms, budget, max_wait_ms, done
        self.queue: deque[list] = deque()   # [request, images not yet taken]
        self.in_flight: list[tuple[_Request, int]] = []

    def add(self, r: _Request) -> None:
        self.queue.append([r, r.units])
        self._maybe_start()

    def abort(self, r: _Request) -> None:
        """Nothing to do: r.gone is set, and batches are formed of requests that are not gone."""

    def _maybe_start(self) -> None:
        while self.queue and self.queue[0][0].gone:
            self.queue.popleft()
        if self.in_flight or not self.queue:
            return
        due = self.queue[0][0].reached + self.max_wait_ms / 1000
        if sum(left for r, left in self.queue if not r.gone) < self.budget and self.clock.now < due:
            self.clock.at(due, self._maybe_start)
            return
        room = self.budget
        while self.queue and room:
            job = self.queue[0]
            if not job[0].gone:
                k = min(room, job[1])
                self.in_flight.append((job[0], k))
                job[1] -= k
                room -= k
            if job[1] == 0 or job[0].gone:
                self.queue.popleft()
        self.clock.at(self.clock.now + self.forward_ms(self.budget - room) / 1000, self._finished)

    def _finished(self) -> None:
        for r, k in self.in_flight:
            r.images_done += k
            if r.images_done == r.units and not r.gone:
                self.done(r)
        self.in_flight = []
        self._maybe_start()

    def live(self, now: float) -> LiveState:
        run = [k for r, k in self.in_flight if not r.gone]
        wait = [left for r, left in self.queue if not r.gone]
        return LiveState(now, running_units=sum(run), running_requests=len(run), running_steps=len(run),
                         queued_units=sum(wait), queued_requests=len(wait), queued_steps=len(wait))


def simulate(policy: Policy, workload: list[tuple[float, Hints]], config: SimConfig = SimConfig()) -> list[Result]:
    """Replay `workload` ((arrival seconds, hints), in any order) through `policy`, against one replica of
    each of its models; returns every request's Result in arrival order."""
    rng = random.Random(config.seed)
    clock = _Clock()

    def noisy(ms: float) -> float:
        return ms * math.exp(rng.gauss(0.0, config.noise))

    def finished(r: _Request) -> None:  # the replica is done: the response reaches the ingress after a hop
        clock.at(clock.now + noisy(config.overhead_ms / 2) / 1000, lambda: end(r, Outcome.OK))

    def end(r: _Request, status: Outcome) -> None:
        if r.gone:
            return
        r.gone = True
        d: Decision = r.result.outcome
        servers[d.model].abort(r)
        r.result.status = status
        r.result.latency_ms = policy.finish(d.ticket, clock.now, status).actual_ms

    servers = {}
    for name, load in policy.loads.items():  # the policy's budgets and profiles; the truth differs in speed
        forward = (lambda st: lambda units: noisy(st(units) * config.slowdown))(load.step_time)
        servers[name] = (_Engine(clock, forward, load.budget, finished) if load.iterative else
                         _Batcher(clock, forward, load.budget, load.max_wait_ms, finished))

    results = []

    def arrive(t: float, hints: Hints) -> None:
        outcome = policy.decide(hints, t)
        results.append(Result(t, hints, outcome))
        if isinstance(outcome, Rejection):
            return
        r = _Request(results[-1], str(outcome.ticket), hints.n, outcome.units, outcome.steps)

        def reach() -> None:
            r.reached = clock.now
            servers[outcome.model].add(r)
        clock.at(t + noisy(config.overhead_ms / 2) / 1000, reach)
        clock.at(t + outcome.slo_ms / 1000, lambda: end(r, Outcome.EXPIRED))

    for t, hints in workload:
        clock.at(t, lambda t=t, hints=hints: arrive(t, hints))

    def snapshot() -> None:
        for name, server in servers.items():
            policy.observe_live(name, server.live(clock.now))
        if clock.pending():
            clock.at(clock.now + config.live_every_s, snapshot)
    if config.live_every_s:
        clock.at(0.0, snapshot)
    clock.run()
    return sorted(results, key=lambda r: r.arrival)


# ---- synthetic models and workloads ---------------------------------------------------------------------

_LADDER = (1, 2, 4, 8, 16, 32, 64)
_DIFFUSION_SETTINGS = [("dpmpp_2m", 10), ("dpmpp_2m", 15), ("dpmpp_2m", 20), ("dpmpp_2m", 25), ("ddim", 25),
                       ("ddim", 50)]


def _synthetic(name: str, family: str, graph: str, ms_1: float, ms_64: float,
               settings: list[SamplingSetting], quality: list[tuple[float, float]]) -> ServedModel:
    """A manifest with a linear latency profile from ms_1 to ms_64 and (FD, class accuracy) per setting."""
    by_setting = {s.key: {"setting": s.to_dict(), "fd": fd, "class_accuracy": acc}
                  for s, (fd, acc) in zip(settings, quality)}
    profile = {graph: {b: ms_1 + (ms_64 - ms_1) * (b - 1) / 63 for b in _LADDER}}
    latency = LatencyProfile(machine={}, provider="synthetic", provider_reason="synthetic", threads=None,
                             measured_at="", ms_per_forward=profile)
    manifest = Manifest(model=name, version="synthetic", family=family, created_at="", graphs=[],
                        sampling=SamplingSettings(default=settings[0], allowed=settings),
                        metrics={**by_setting[settings[0].key], "by_setting": by_setting}, latency=latency)
    return ServedModel(name, manifest)


def synthetic_models() -> list[ServedModel]:
    """The five families with this repo's CPU profile (genserve build, 2 threads) and made-up but ordered
    quality: diffusion improves with steps, DPM-Solver++ beats DDIM at equal steps."""
    diffusion = [SamplingSetting(s, k, 2.0) for s, k in _DIFFUSION_SETTINGS]
    return [
        _synthetic("gan", "gan", "generate", 0.4, 21.0, [SamplingSetting()], [(150.0, 0.84)]),
        _synthetic("vae", "vae", "decode", 0.1, 4.0, [SamplingSetting()], [(209.0, 0.80)]),
        _synthetic("flow", "flow", "sample", 1.0, 37.0, [SamplingSetting(temperature=0.7)], [(530.0, 0.71)]),
        _synthetic("diffusion", "diffusion", "denoise", 1.7, 84.0, diffusion,
                   [(47.0, 0.973), (43.0, 0.975), (41.5, 0.976), (40.5, 0.977), (45.0, 0.974), (40.0, 0.977)]),
        _synthetic("pixelcnn", "pixelcnn", "step", 1.8, 116.0, [SamplingSetting(temperature=1.0)], [(644.0, 0.34)]),
    ]


def store_models(store_uri: str | None) -> list[ServedModel]:
    """Every model of a store at its `latest` alias."""
    from model_store.store import ModelStore

    store = ModelStore.open(store_uri)
    return [ServedModel(name, store.manifest(f"{name}@latest")) for name in store.models()]


def poisson_ramp(rates: list[float], seconds_per_level: float, slo_ms: list[float], *, n: int = 1,
                 class_id: int = 0, seed: int = 0) -> list[tuple[float, Hints]]:
    """Poisson arrivals whose rate steps through `rates` (requests/s), each for seconds_per_level; each
    request's SLO drawn uniformly from slo_ms."""
    rng = random.Random(seed)
    workload, start = [], 0.0
    for rate in rates:
        t = start + rng.expovariate(rate)
        while t < start + seconds_per_level:
            workload.append((t, Hints(n=n, class_id=class_id, latency_slo_ms=rng.choice(slo_ms))))
            t += rng.expovariate(rate)
        start += seconds_per_level
    return workload


@dataclass(frozen=True)
class Summary:
    requests: int
    rejected: float          # share of requests
    attainment: float        # share of admitted requests that met their SLO
    mean_fd: float           # over delivered images (nan when none was measured)


def summarize(results: list[Result]) -> Summary:
    admitted = [r for r in results if r.admitted]
    delivered = [r for r in admitted if r.status is Outcome.OK and r.outcome.quality is not None]
    images = sum(r.hints.n for r in delivered)
    return Summary(len(results), 1 - len(admitted) / max(len(results), 1),
                   sum(r.met for r in admitted) / len(admitted) if admitted else math.nan,
                   sum(r.outcome.quality.fd * r.hints.n for r in delivered) / images if images else math.nan)


def compare(models: list[ServedModel], rates: list[float], seconds_per_level: float, slo_ms: list[float], *,
            n: int = 1, sim: SimConfig = SimConfig(), policy_config: PolicyConfig = PolicyConfig()) -> str:
    """`auto` against each model at its default setting (named explicitly: admission control only), on one
    Poisson ramp; a markdown table per load level."""
    workload = poisson_ramp(rates, seconds_per_level, slo_ms, n=n, seed=sim.seed)
    rows = ["| load (req/s) | strategy | requests | rejected | SLO met (admitted) | mean FD (delivered) |",
            "|---|---|---|---|---|---|"]
    by_strategy = {}
    for strategy in [AUTO] + [m.name for m in models]:
        jobs = [(t, replace(h, model=strategy)) for t, h in workload]
        by_strategy[strategy] = simulate(Policy(models, policy_config), jobs, sim)
    for i, rate in enumerate(rates):
        for strategy, results in by_strategy.items():
            level = [r for r in results if i * seconds_per_level <= r.arrival < (i + 1) * seconds_per_level]
            s = summarize(level)
            rows.append(f"| {rate:g} | {strategy} | {s.requests} | {s.rejected:.1%} | {s.attainment:.1%} | "
                        f"{s.mean_fd:.1f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m serving.policy.simulator", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default=None, metavar="PATH_OR_URI",
                   help="simulate the models of this store (run `genserve build` first); default: synthetic ones")
    p.add_argument("--rates", default="5,20,50,100,200", help="load levels, requests/s (default: %(default)s)")
    p.add_argument("--level-seconds", type=float, default=10.0, help="simulated seconds per level (default: 10)")
    p.add_argument("--slo-ms", default="100,500,2000", help="SLO mix, drawn uniformly (default: %(default)s)")
    p.add_argument("--n", type=int, default=1, help="images per request (default: 1)")
    p.add_argument("--slowdown", type=float, default=1.0, help="true forward time / profile (default: 1)")
    p.add_argument("--noise", type=float, default=0.05, help="lognormal sigma of each forward (default: 0.05)")
    p.add_argument("--overhead-ms", type=float, default=3.0, help="per-request hop time (default: 3)")
    p.add_argument("--no-live", action="store_true", help="the policy sees no replica load, only its ledger")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    models = store_models(args.store) if args.store else synthetic_models()
    sim = SimConfig(slowdown=args.slowdown, noise=args.noise, overhead_ms=args.overhead_ms,
                    live_every_s=None if args.no_live else 0.1, seed=args.seed)
    print(compare(models, [float(r) for r in args.rates.split(",")], args.level_seconds,
                  [float(s) for s in args.slo_ms.split(",")], n=args.n, sim=sim))


if __name__ == "__main__":
    main()
