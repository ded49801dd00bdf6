"""The latency/quality policy: for each request, the best-quality candidate predicted to finish before its
deadline, admitted against the work already admitted; else a rejection with Retry-After, or with
best_effort the fastest candidate.

The ingress owns one Policy and calls it from its one event loop:

    outcome = policy.decide(hints, time.monotonic())      # on arrival
    if isinstance(outcome, Rejection): answer outcome.http_status (429 + Retry-After, gRPC RESOURCE_EXHAUSTED)
    else: send a GenerationJob with outcome.model / outcome.setting, and whatever happens,
          policy.finish(outcome.ticket, time.monotonic(), Outcome.OK | EXPIRED | CANCELLED | FAILED)
    policy.observe_live(model, LiveState(...))            # whenever a replica's load is read

Every method is synchronous and short (no awaits), so on one event loop calls never interleave and no
lock is needed; the policy is NOT thread-safe.
"""
from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from core.settings import SamplingSetting
from model_store.manifest import Manifest
from serving.config import ITERATIVE_GRAPH, ONE_PASS_GRAPH, IterativeConfig, OnePassConfig
from serving.policy.candidates import (GOAL_FAMILIES, TIERS, Candidate, Quality, QualityFloor, candidates_of,
                                       explicit_candidate, tier_floor)
from serving.policy.latency import Correction, LiveState, Margin, ModelLoad, StepTime

AUTO = "auto"
# A cascade's default threshold on the judge's confidence in the class asked for (serving/api/cascade.py):
# from benchmarks/results/cascade.md, the lowest that gives diffusion-like class accuracy
CASCADE_THRESHOLD = 0.7


@dataclass(frozen=True)
class PolicyConfig:
    # A request without latency_slo_ms (or a client timeout) is held to max(default_slo_ms, default_slo_idle x
    # its time on an idle replica): admitted only if predicted in time, dropped at it, like any SLO. Without
    # one, past capacity every request was admitted into an ever longer queue and goodput collapsed (issue 14).
    # The floor suits interactive generation; the factor leaves long work (PixelCNN: 784 steps, ~2 s alone)
    # room to share its replica (at 4x, four concurrent PixelCNN requests were already refused).
    default_slo_ms: float = 3000.0
    default_slo_idle: float = 10.0
    # Start of the fitted per-request overhead (Ray hops, PNG encoding): a few ms on one machine.
    overhead_prior_ms: float = 5.0
    # Weight of the newest observation in the fit: follows a slowdown within ~10-20 requests.
    alpha: float = 0.1
    # The margin: 1.2x until 20 requests finished, then the 99th percentile of the last 200 actual/expected
    # ratios of the last minute (recent enough to follow a change; latency.Margin says why they expire). Under saturation every admitted request sits at the
    # margin's edge, so the quantile is the attainment it buys: 0.95 measured ~96% in the simulator.
    margin_prior: float = 1.2
    margin_quantile: float = 0.99
    margin_window: int = 200
    margin_min_samples: int = 20
    # The SLO is the client's; the policy's clock runs at the ingress. This much of it is left for what the
    # ingress cannot see: the proxy hop in and the answer's way out (serving.api.admission sets it).
    edge_ms: float = 0.0


@dataclass(frozen=True)
class ServedModel:
    """A model the ingress serves: its name, its manifest (candidates, quality, latency profile), and its
    deployment's batching settings."""

    name: str
    manifest: Manifest
    budget: int | None = None           # max_batch_rows / max_batch_images; None: the deployment default
    max_wait_ms: float = OnePassConfig().max_wait_ms  # one-pass only

    @property
    def graph(self) -> str:
        return ITERATIVE_GRAPH.get(self.manifest.family) or ONE_PASS_GRAPH[self.manifest.family]


@dataclass(frozen=True)
class Hints:
    """What a request says about itself, validated by the API layer."""

    model: str = AUTO                      # "auto": the policy chooses; a model name: served as asked, admission only
    n: int = 1                             # images
    class_id: int = 0                      # NULL_CLASS (unconditional) halves a guided diffusion request's rows
    latency_slo_ms: float | None = None    # from arrival at the ingress; None: the default (PolicyConfig)
    tier: str | None = None                # draft | standard | best (candidates.TIERS); None = draft
    max_fd: float | None = None            # an explicit floor, with or instead of the tier
    min_class_accuracy: float | None = None
    goal: str = "sample"                   # sample | likelihood (flow, pixelcnn) | latent (vae)
    best_effort: bool = False              # when nothing fits the SLO: the fastest candidate, not a 429
    # Explicit sampler settings: with a named model they override its default; with auto they restrict
    # the candidates to those settings (steps=20: the diffusion settings with 20 steps).
    setting: SamplingSetting = SamplingSetting()

    def __post_init__(self):
        if self.tier is not None and self.tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}, got {self.tier!r}")
        if self.goal not in GOAL_FAMILIES:
            raise ValueError(f"goal must be one of {tuple(GOAL_FAMILIES)}, got {self.goal!r}")


@dataclass(frozen=True)
class Considered:
    """One candidate the decision predicted, best quality first."""

    label: str
    predicted_ms: float          # inf: wider than the model's row budget
    fits: bool                   # predicted_ms x margin <= SLO, and no admitted request made late
    delays_others: bool          # it would make admitted requests miss their SLO (their rows slow its steps)
    fd: float | None


@dataclass(frozen=True)
class Escalation:
    """A cascade's stage 2 as planned at admission, for the worst case that every image escalates."""

    label: str                   # the best stage-2 candidate that fit the worst case then
    predicted_ms: float          # stage 1 + judge + stage 2 for all n images, each x its margin
    judge_ms: float              # the judge's planned time


@dataclass(frozen=True)
class Decision:
    """Admitted: serve it like this, then hand `ticket` to finish()."""

    ticket: int
    model: str
    family: str
    setting: SamplingSetting     # the full sampling setting for the job (sampler, steps, guidance_scale, ...)
    label: str                   # the candidate, e.g. "diffusion dpmpp_2m/20 g=2.0": the metrics label
    quality: Quality | None
    units: int                   # rows per step (images for one-pass) it was admitted with
    steps: int                   # engine steps (1 for one-pass)
    predicted_ms: float          # end to end at the ingress
    margin: float
    slo_ms: float
    best_effort: bool            # admitted although not predicted in time (best_effort requests only)
    reason: str                  # one line for the response and the logs
    considered: tuple[Considered, ...]
    escalation: Escalation | None = None  # a cascade's stage 1: its planned stage 2

    def explain(self) -> dict[str, Any]:
        """What the response says about the choice (the ingress adds the actual latency)."""
        return {"model": self.model, "settings": self.setting.to_dict(), "predicted_ms": round(self.predicted_ms, 1),
                "margin": round(self.margin, 2), "slo_ms": self.slo_ms, "reason": self.reason}


@dataclass(frozen=True)
class Rejection:
    reason: str                  # overloaded | slo_unattainable (even an idle replica is too slow) | no_candidate
    message: str
    retry_after_s: float | None  # overloaded: when enough admitted work will have drained; else None
    considered: tuple[Considered, ...]

    @property
    def http_status(self) -> int:
        """429 (gRPC RESOURCE_EXHAUSTED) when the SLO cannot be met; 400 when no model suits the request."""
        return 400 if self.reason == "no_candidate" else 429


class Outcome(Enum):
    OK = "ok"                    # images delivered
    EXPIRED = "expired"          # the deadline passed first: an SLO miss
    CANCELLED = "cancelled"      # the client went away: no verdict
    FAILED = "failed"            # an error: no verdict


@dataclass(frozen=True)
class Finished:
    label: str
    predicted_ms: float
    actual_ms: float
    slo_ms: float
    met: bool


@dataclass
class PolicyStats:
    """Plain counters, exported to Prometheus by the ingress."""

    decisions: Counter = field(default_factory=Counter)    # candidate label -> requests admitted with it
    best_effort: Counter = field(default_factory=Counter)  # label -> of those, admitted though not in time
    rejections: Counter = field(default_factory=Counter)   # Rejection.reason -> requests
    slo_met: Counter = field(default_factory=Counter)      # label -> finished within the SLO
    slo_missed: Counter = field(default_factory=Counter)   # label -> finished late or expired
    abandoned: Counter = field(default_factory=Counter)    # label -> cancelled or failed


@dataclass
class _Admitted:
    candidate: Candidate
    at: float                    # policy clock at admission
    slo_ms: float
    predicted_ms: float          # at the decision: what the response reports
    # The latest expectation, learnt from at the end: later admissions slow a step-batched request down
    # within its SLO, by design, and that is not an error of the latency model.
    expected_ms: float           # end to end
    compute_ms: float            # the latency model's input for it: profile ms from admission to the end

    def expect(self, now: float, remaining_ms: float, fit: Correction) -> None:
        """Runs when a later admission re-played this request's model: it now ends remaining_ms (profile)
        from now."""
        self.compute_ms = (now - self.at) * 1000 / fit.factor + remaining_ms
        self.expected_ms = fit.predict(self.compute_ms)


class Policy:
    """The decision, the ledgers of admitted work per model, and the counters; see the module docstring."""

    def __init__(self, models: list[ServedModel], config: PolicyConfig = PolicyConfig()):
        self.config = config
        self.manifests = {m.name: m.manifest for m in models}
        self.loads = {m.name: _load_for(m, config) for m in models}
        self.candidates = [c for m in models for c in candidates_of(m.name, m.manifest)]
        self.stats = PolicyStats()
        self._admitted: dict[int, _Admitted] = {}
        self._tickets = itertools.count()

    def decide(self, hints: Hints, now: float) -> Decision | Rejection:
        """Runs on arrival. A Decision is admitted at once (its work enters the ledger), so the next
        request of a burst already sees it; finish() must follow exactly once."""
        if hints.model == AUTO:
            pool = self._eligible(hints)
            if not pool:
                return self._reject("no_candidate", "no served model meets the request's goal, settings and "
                                    "quality floor", None, ())
        else:
            if hints.model not in self.manifests:
                raise ValueError(f"unknown model {hints.model!r}; served: {sorted(self.manifests)}")
            pool = [explicit_candidate(hints.model, self.manifests[hints.model], hints.setting)]

        estimates = []
        for c in pool:  # best quality first: the first that fits is the choice
            estimates.append(e := self._estimate(c, hints, now, self._slo_ms(c, hints, now)))
            if e.fits:
                return self._admit(e, hints, now, False, estimates)
        if hints.best_effort:
            fastest = min(estimates, key=lambda e: e.predicted_ms)
            if math.isfinite(fastest.predicted_ms):
                return self._admit(fastest, hints, now, True, estimates)
        return self._too_slow(estimates, hints, now)

    def decide_cascade(self, hints: Hints, judge_ms: float, now: float) -> Decision | None:
        """Runs on arrival of an `auto` request that asked for a cascade: stage 1, the best one-pass candidate
        in time, admitted only if stage 1 + the judge (judge_ms) + a stage-2 candidate for ALL n images would
        still meet the SLO (each stage's prediction x its margin, on the load admitted now). Stage 2 is not
        admitted here: escalate() admits it for the images that need it, if they still fit then. None: no
        such plan (the caller decides without a cascade). Quality floors and tiers do not apply: the judge
        is the cascade's floor, image by image."""
        stage1 = [c for c in self._eligible(Hints(goal="sample")) if not c.iterative]
        for c1 in stage1:
            e1 = self._estimate(c1, hints, now, slo := self._slo_ms(c1, hints, now))
            if not e1.fits:
                continue
            for c2 in self._stage2(c1.quality):  # best first: the best that fits the worst case is the plan
                e2 = self._estimate(c2, hints, now, slo)
                worst = e1.predicted_ms * e1.margin + judge_ms + e2.predicted_ms * e2.margin
                if worst <= slo and not e2.delays_ms:
                    d = self._admit(e1, hints, now, False, [e1])
                    plan = Escalation(c2.label, worst, judge_ms)
                    why = (f"cascade stage 1 {c1.label}: with the judge ({judge_ms:.0f} ms) and {c2.label} for all "
                           f"{hints.n} image(s) predicted {worst:.0f} ms <= SLO {slo:.0f} ms")
                    return replace(d, reason=why, escalation=plan)
        return None

    def escalate(self, first: Decision, hints: Hints, now: float) -> Decision | str:
        """Runs when the judge has failed some of a cascade's images: stage 2 for them (hints.n, with what is
        left of the deadline as latency_slo_ms), the best candidate better than stage 1 that is predicted in
        time now, admitted like any request (finish() follows). Else why none is: the escalation is not
        started."""
        estimates = []
        for c in self._stage2(first.quality):
            estimates.append(e := self._estimate(c, hints, now, self._slo_ms(c, hints, now)))
            if e.fits:
                why = (f"cascade stage 2 {c.label}: predicted {e.predicted_ms:.0f} ms x margin {e.margin:.2f} "
                       f"<= the {e.slo_ms:.0f} ms left")
                return replace(self._admit(e, hints, now, False, estimates), reason=why)
        if not estimates:
            return "no stage-2 candidate is served"
        fastest = min(estimates, key=lambda e: e.predicted_ms)
        return f"no time: {fastest.why_not()} > the {fastest.slo_ms:.0f} ms left"

    def _stage2(self, first: Quality) -> list[Candidate]:
        """What a cascade escalates to: measured step-batched candidates of better class accuracy than
        stage 1's, best first (diffusion's settings; PixelCNN's class accuracy is far below a GAN's)."""
        return [c for c in self._eligible(Hints(goal="sample"))
                if c.iterative and c.quality.class_accuracy > first.class_accuracy]

    def finish(self, ticket: int, now: float, outcome: Outcome = Outcome.OK) -> Finished:
        """Runs once per Decision when its request ends, however it ends: the work leaves the ledger, and a
        delivered or expired request's time corrects the latency model and the margin."""
        adm = self._admitted.pop(ticket)
        load = self.loads[adm.candidate.model]
        load.remove(ticket, now)
        actual = (now - adm.at) * 1000
        label = adm.candidate.label
        met = outcome is Outcome.OK and actual <= adm.slo_ms
        if outcome in (Outcome.OK, Outcome.EXPIRED):
            load.fit.observe(adm.compute_ms, actual)
            load.margin.observe(actual / adm.expected_ms, now)
            (self.stats.slo_met if met else self.stats.slo_missed)[label] += 1
        else:
            self.stats.abandoned[label] += 1
        return Finished(label, adm.predicted_ms, actual, adm.slo_ms, met)

    def observe_live(self, model: str, state: LiveState) -> None:
        """Runs whenever the ingress has read a replica's load."""
        self.loads[model].observe_live(state)

    def _eligible(self, hints: Hints) -> list[Candidate]:
        """Measured candidates that serve the goal, match pinned settings and clear the floors, best first
        (fewer steps first on a tie: same quality, less work)."""
        families, pinned = GOAL_FAMILIES[hints.goal], hints.setting.to_dict()
        pool = [c for c in self.candidates if c.quality is not None and c.family in families
                and all(getattr(c.setting, k) == v for k, v in pinned.items())]
        floors = (tier_floor(hints.tier, pool), QualityFloor(hints.max_fd, hints.min_class_accuracy))
        return sorted((c for c in pool if all(f.admits(c.quality) for f in floors)),
                      key=lambda c: (*c.rank(), c.steps()))

    def _slo_ms(self, c: Candidate, hints: Hints, now: float) -> float:
        """The SLO candidate c is held to, at the ingress: the request's own, else the default (PolicyConfig),
        less the edge the ingress cannot see."""
        slo = hints.latency_slo_ms
        if slo is None:
            idle = self._estimate(c, hints, now, math.inf, idle=True).predicted_ms
            slo = max(self.config.default_slo_ms, self.config.default_slo_idle * idle)
        return max(1.0, slo - self.config.edge_ms)

    def _estimate(self, c: Candidate, hints: Hints, now: float, slo: float, *, idle: bool = False) -> _Estimate:
        load = self.loads[c.model]
        units = c.units(hints.n, hints.class_id)
        if c.iterative and units > load.budget:  # the engine refuses a request wider than its batch
            return _Estimate(c, math.inf, math.inf, load.margin.value, 0.0, {}, slo)
        load.advance(now)
        load.margin.expire(now)
        p = load.project(units, c.steps(), now, idle=idle)
        return _Estimate(c, p.compute_ms, load.fit.predict(p.compute_ms), load.margin.value,
                         load.fit.factor * p.delays_ms, p.others_ms, slo)

    def _admit(self, e: _Estimate, hints: Hints, now: float, best_effort: bool, estimates: list[_Estimate]) -> Decision:
        c, slo = e.candidate, e.slo_ms
        ticket, units = next(self._tickets), c.units(hints.n, hints.class_id)
        load = self.loads[c.model]
        load.admit(ticket, units, c.steps(), slo, e.margin, now)
        for other, remaining in e.others_ms.items():
            if other is not None:
                self._admitted[other].expect(now, remaining, load.fit)
        self._admitted[ticket] = _Admitted(c, now, slo, e.predicted_ms, e.predicted_ms, e.compute_ms)
        self.stats.decisions[c.label] += 1
        if best_effort:
            self.stats.best_effort[c.label] += 1
            why = (f"best effort, the fastest: predicted {e.predicted_ms:.0f} ms x margin {e.margin:.2f}, "
                   f"SLO {slo:.0f} ms")
        else:
            q = f" (FD {c.quality.fd:.1f}, class acc. {c.quality.class_accuracy:.1%})" if c.quality else ""
            head = "requested" if hints.model != AUTO else "best quality in time"
            why = f"{head}{q}: predicted {e.predicted_ms:.0f} ms x margin {e.margin:.2f} <= SLO {slo:.0f} ms"
            if skipped := [k for k in estimates if k is not e]:
                why += "; better but too slow: " + ", ".join(k.why_not() for k in skipped[:3])
        return Decision(ticket, c.model, c.family, c.setting, c.label, c.quality, units, c.steps(),
                        e.predicted_ms, e.margin, slo, best_effort, f"{c.label}: {why}",
                        tuple(k.considered() for k in estimates))

    def _too_slow(self, estimates: list[_Estimate], hints: Hints, now: float) -> Rejection:
        """Nothing fits: Retry-After is the least time after which some candidate would. Until its queue has
        drained, a prediction falls by the time waited (the ledger drains in real time), so that is
        predicted - SLO / margin, or until the admitted requests it would delay are done, for candidates
        that an idle replica would serve in time."""
        considered = tuple(e.considered() for e in estimates)
        waits = [max(e.predicted_ms - e.slo_ms / e.margin, e.delays_ms) / 1000 for e in estimates
                 if self._estimate(e.candidate, hints, now, e.slo_ms, idle=True).fits]
        fastest = min(estimates, key=lambda e: e.predicted_ms)
        slo = f"the SLO of {fastest.slo_ms:.0f} ms" + ("" if hints.latency_slo_ms else " (the default: the request set none)")
        if not waits:
            return self._reject("slo_unattainable", f"no candidate can finish within {slo} even on an idle replica; "
                                f"fastest: {fastest.why_not()}", None, considered)
        retry = min(waits)
        return self._reject("overloaded", f"no candidate is predicted to finish within {slo} under the load "
                            f"admitted; fastest: {fastest.why_not()}; retry in {retry:.2f} s", retry, considered)

    def _reject(self, reason: str, message: str, retry_after_s: float | None,
                considered: tuple[Considered, ...]) -> Rejection:
        self.stats.rejections[reason] += 1
        return Rejection(reason, message, retry_after_s, considered)


@dataclass(frozen=True)
class _Estimate:
    """One candidate's prediction for the request at hand."""

    candidate: Candidate
    compute_ms: float            # the latency model's input, kept for the fit
    predicted_ms: float          # end to end
    margin: float
    delays_ms: float             # 0, or how long until the admitted requests it would make late are done
    others_ms: dict[int | None, float]  # ticket -> when admitted work ends with this one (profile ms from now)
    slo_ms: float

    @property
    def fits(self) -> bool:
        return self.predicted_ms * self.margin <= self.slo_ms and not self.delays_ms

    def why_not(self) -> str:
        if math.isinf(self.predicted_ms):
            return f"{self.candidate.label}: wider than its row budget"
        delays = " and would make admitted requests late" if self.delays_ms else ""
        return f"{self.candidate.label} {self.predicted_ms:.0f} ms{delays}"

    def considered(self) -> Considered:
        c = self.candidate
        return Considered(c.label, self.predicted_ms, self.fits, bool(self.delays_ms),
                          c.quality.fd if c.quality else None)


def _load_for(m: ServedModel, config: PolicyConfig) -> ModelLoad:
    if m.manifest.latency is None or m.graph not in m.manifest.latency.ms_per_forward:
        raise ValueError(f"{m.name}: the manifest has no latency profile of graph {m.graph!r}; rebuild it "
                         "with `genserve build`")
    iterative = m.manifest.family in ITERATIVE_GRAPH
    budget = m.budget or (IterativeConfig().max_batch_rows if iterative else OnePassConfig().max_batch_images)
    return ModelLoad(iterative=iterative, step_time=StepTime(m.manifest.latency.ms_per_forward[m.graph]),
                     budget=budget, max_wait_ms=m.max_wait_ms,
                     correction=Correction(config.overhead_prior_ms, config.alpha),
                     margin=Margin(config.margin_prior, config.margin_quantile, config.margin_window,
                                   config.margin_min_samples))
