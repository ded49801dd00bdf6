"""The latency/quality policy under real load, `auto` against each fixed choice:

    python -m benchmarks.policy [--out benchmarks/results] [--stage-s S] [--quick] [--strategies auto ...]

A Poisson ramp from 0.2x to 3x the diffusion path's capacity, every request with an SLO from {100, 500,
2000} ms and a quality tier (none, standard, best), sent through a Ray Serve app serving all five models,
freshly started for each strategy, on the same seeded schedule (request i asks the same of every strategy):
`auto` (the policy chooses model and settings) and each fixed choice (a model, for diffusion also its sampler setting,
named in the request: the policy then only admits or rejects it; the tier is ignored). Per load level and
strategy: the rejection rate (429), the SLO attainment of the admitted requests (answered OK within their
own SLO, timed by the client), and the mean FD and class accuracy of the images served, read from the
store's manifests as the policy reads them. The auto run's arrivals and hints are then replayed through
serving/policy/simulator.py, to set the simulator against the real run.

Writes OUT/policy.md, policy.json and policy.png; the load generator's runs go to OUT/runs/policy-<strategy>/
(`genserve report` turns one into an HTML page). The store is built if it is not current.
"""
from __future__ import annotations

import argparse
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

from benchmarks.serving import MAX_ROWS, _deployment, load, raw_rows_per_second, serving, write
from core.settings import SamplingSetting
from genserve.build import build
from loadtests.records import Record, RunData
from loadtests.scenario import OpenLoop, Stage, Template
from loadtests.stats import within_slo
from model_store.store import ModelStore
from serving.api.classes import CLASS_NAMES
from serving.config import ITERATIVE_GRAPH
from serving.policy import Candidate, Hints, Policy, ServedModel, candidates_of
from serving.policy.candidates import explicit_candidate, tier_floor
from serving.policy.simulator import SimConfig, Summary, simulate, store_models
from serving.policy.simulator import summarize as simulated_summary

LOADS = (0.2, 0.5, 1.0, 2.0, 3.0)        # offered load, x the diffusion path's capacity
SLOS_MS = (100.0, 500.0, 2000.0)
TIERS = (None, "standard", "best")       # None: no tier (draft)
CAPACITY_STEPS = 25                      # the diffusion path's capacity is that of dpmpp_2m/25, guided
MODEL_CPUS = 0.4                         # five model replicas fit a 2-CPU Ray; each runs one ORT thread anyway
TARGET = 0.99                            # SLO attainment the policy must hold
# name -> what its requests ask for: auto, or a model (for diffusion also a sampler setting) named explicitly
STRATEGIES: dict[str, dict[str, Any]] = {
    "auto": {"model": "auto"},
    "gan": {"model": "gan"},
    "vae": {"model": "vae"},
    "flow": {"model": "flow"},
    "diffusion dpmpp_2m/25": {"model": "diffusion", "sampler": "dpmpp_2m", "steps": 25},
    "diffusion dpmpp_2m/20": {"model": "diffusion", "sampler": "dpmpp_2m", "steps": 20},  # the best measured FD
    "diffusion dpmpp_2m/10": {"model": "diffusion", "sampler": "dpmpp_2m", "steps": 10},
}
QUICK = ("auto", "gan", "diffusion dpmpp_2m/25")


def mix(strategy: str) -> list[Template]:
    """Every (SLO, tier, class) once, equally likely, one image each. The same length for every strategy, so
    the seeded draws give request i the same SLO, tier and class in every run."""
    return [Template(prompt=name, latency_slo_ms=slo, quality=tier, **STRATEGIES[strategy])
            for slo in SLOS_MS for tier in TIERS for name in CLASS_NAMES]


def policy_app(store: str) -> dict[str, Any]:
    """genserve's application as deploy/serve_config.yaml has it (all five models, their user_config), each
    model on MODEL_CPUS."""
    from genserve.launch import load_config

    app = dict(load_config()["applications"][0])
    app.update(args={**app["args"], "store": store},
               deployments=[_deployment(d["name"], 0 if d["name"] == "Ingress" else MODEL_CPUS, d.get("user_config"))
                            for d in app["deployments"]])
    return app


class Catalog:
    """The policy's candidates as the store's manifests define them: what a served image's settings were worth."""

    def __init__(self, models: list[ServedModel]):
        self.manifests = {m.name: m.manifest for m in models}
        self.by_setting = {(c.model, c.setting.key): c
                           for m in models for c in candidates_of(m.name, m.manifest)}
        self.measured = [c for c in self.by_setting.values() if c.quality is not None]
        self.best = min(self.measured, key=Candidate.rank)

    def served(self, r: Record) -> Candidate:
        """The candidate that served a request, from the policy's account in the response."""
        p = r.policy or {}
        model = p.get("model") or r.model
        setting = SamplingSetting.from_dict(p.get("settings") or r.settings)
        return (self.by_setting.get((model, setting.key))
                or explicit_candidate(model, self.manifests[model], setting))

    def fixed(self, strategy: str) -> Candidate:
        ask = dict(STRATEGIES[strategy])
        model = ask.pop("model")
        return explicit_candidate(model, self.manifests[model], SamplingSetting.from_dict(ask))

    def allowed(self, tier: str | None) -> set[str]:
        """The labels of the candidates auto may choose for a request of this tier."""
        floor = tier_floor(tier, self.measured)
        return {c.label for c in self.measured if floor.admits(c.quality)}


@dataclass(frozen=True)
class StageResult:
    load: float                   # x the diffusion path's capacity
    offered_rps: float
    requests: int                 # measured (warm-up left out)
    rejected: float               # share answered 429
    rejections: dict[str, int]    # reason (overloaded | slo_unattainable) -> requests
    attainment: float | None      # of the admitted (not 429): share answered OK within their own SLO
    images: int                   # served OK (one per request)
    mean_fd: float | None         # over the images served; None: none, or some from an unmeasured setting
    mean_accuracy: float | None
    mean_fd_by_slo: dict[str, float | None]  # SLO (ms) -> mean FD of the images served to requests with it
    choices: dict[str, float]     # candidate label -> share of the images served


def rejection_reason(r: Record) -> str:
    # the 429's message is all the record keeps; the policy says "even on an idle replica" when no wait helps
    return "slo_unattainable" if "even on an idle replica" in (r.error or "") else "overloaded"


def mean_quality(served: list[Candidate]) -> tuple[float | None, float | None]:
    """Mean FD and class accuracy over the images served; None when none was, or one came from a setting
    with no measured quality."""
    if not served or any(c.quality is None for c in served):
        return None, None
    return (sum(c.quality.fd for c in served) / len(served),
            sum(c.quality.class_accuracy for c in served) / len(served))


def stage_results(run: RunData, catalog: Catalog, capacity: float) -> list[StageResult]:
    rows = []
    for w in run.windows:
        records = [r for r in run.records if r.stage == w.stage and not r.warmup]
        admitted = [r for r in records if not r.rejected]
        served = [(r.slo_ms, catalog.served(r)) for r in records if r.ok]
        candidates = [c for _, c in served]
        fd, accuracy = mean_quality(candidates)
        rows.append(StageResult(
            load=round(w.offered_rate / capacity, 2), offered_rps=w.offered_rate, requests=len(records),
            rejected=1 - len(admitted) / len(records) if records else 0.0,
            rejections=dict(Counter(rejection_reason(r) for r in records if r.rejected)),
            attainment=sum(within_slo(r) for r in admitted) / len(admitted) if admitted else None,
            images=len(served), mean_fd=fd, mean_accuracy=accuracy,
            mean_fd_by_slo={f"{slo:g}": mean_quality([c for s, c in served if s == slo])[0] for slo in SLOS_MS},
            choices={label: k / len(served) for label, k in Counter(c.label for c in candidates).most_common()}))
    return rows


def misses(run: RunData) -> dict[str, Any]:
    """Where the admitted requests that missed their SLO lost it, and the client's time outside the policy's
    clock, which runs at the ingress (the HTTP proxy, the response's way back, the load generator)."""
    admitted = [r for r in run.records if not r.warmup and not r.rejected]
    where = Counter("with no answer (504 or an error)" if not r.ok else
                    "late at the ingress" if r.policy["actual_ms"] > r.slo_ms else
                    "in time at the ingress but late at the client"
                    for r in admitted if not within_slo(r))
    outside = [r.latency_s * 1000 - r.policy["actual_ms"] for r in admitted if r.ok]
    p50, p99 = np.percentile(outside, [50, 99]).tolist() if outside else (math.nan, math.nan)
    return {"missed": dict(where), "outside_ms_p50": p50, "outside_ms_p99": p99}


def replay(run: RunData, models: list[ServedModel], slowdown: float) -> list[Summary]:
    """The auto run's requests (warm-up included: the server saw it) at their intended send times, through
    the simulator's replicas, whose forwards take the manifests' profiles x `slowdown`; per load level."""
    records = sorted(run.records, key=lambda r: r.intended_send)
    templates = mix("auto")
    workload = [(r.intended_send, Hints(n=t.n, class_id=CLASS_NAMES.index(t.prompt), latency_slo_ms=t.latency_slo_ms,
                                        tier=t.quality))
                for r in records for t in [templates[r.template]]]
    results = simulate(Policy(models), workload, SimConfig(slowdown=slowdown))  # in arrival order, as records
    by_stage: dict[int, list] = {}
    for r, result in zip(records, results):
        if not r.warmup:
            by_stage.setdefault(r.stage, []).append(result)
    return [simulated_summary(by_stage.get(w.stage, [])) for w in run.windows]


def needless_rejections(runs: dict[str, RunData], catalog: Catalog) -> list[dict[str, Any]]:
    """auto's rejections of requests that a fixed choice the request's tier allows answered within their SLO
    in its own run (the same request: the schedules are the same). A hint, not proof: that run had the
    replica to itself."""
    templates = mix("auto")
    fixed = {name: catalog.fixed(name).label for name in runs if name != "auto"}
    answers = {name: {r.id: r for r in runs[name].records} for name in fixed}
    found = []
    for r in runs["auto"].records:
        if r.warmup or not r.rejected:
            continue
        tier = templates[r.template].quality
        allowed = catalog.allowed(tier)
        served_by = [name for name, label in fixed.items()
                     if label in allowed and r.id in answers[name] and within_slo(answers[name][r.id])]
        if served_by:
            found.append({"id": r.id, "stage": r.stage, "slo_ms": r.slo_ms, "tier": tier,
                          "reason": rejection_reason(r), "answered_in_time_by": served_by})
    return found


# ---- the report ----------------------------------------------------------------------------------------

def _pct(x: float | None) -> str:
    return "—" if x is None or math.isnan(x) else f"{x * 100:.1f}%"


def _fd(x: float | None) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.1f}"


def verdicts(results: dict[str, list[StageResult]], catalog: Catalog, needless: list[dict[str, Any]],
             missed: dict[str, Any]) -> list[str]:
    def met(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    auto = results["auto"]
    held = [s for s in auto if s.attainment is not None]
    worst = min(held, key=lambda s: s.attainment)
    lines = [f"- auto holds >= {TARGET:.0%} SLO attainment of admitted requests at every load level: "
             f"{met(all(s.attainment >= TARGET for s in held))} (lowest {_pct(worst.attainment)}, at {worst.load:g}x; "
             "its misses: " + (", ".join(f"{v} {k}" for k, v in missed["missed"].items()) or "none") +
             f"; the client's time outside the policy's clock: median {missed['outside_ms_p50']:.0f} ms, "
             f"p99 {missed['outside_ms_p99']:.0f} ms)"]

    low, best, loose = auto[0], catalog.best, f"{max(SLOS_MS):g}"
    fd = low.mean_fd_by_slo[loose]
    lines.append(f"- at low load ({low.load:g}x) auto's mean FD equals the best candidate's ({best.label}, "
                 f"{best.quality.fd:.1f}) for the requests with the loosest SLO ({loose} ms): "
                 f"{met(fd is not None and fd <= best.quality.fd * 1.01)} ({_fd(fd)}; by SLO: "
                 + ", ".join(f"{k} ms {_fd(v)}" for k, v in low.mean_fd_by_slo.items())
                 + f"; all: {_fd(low.mean_fd)}, {_pct(low.choices.get(best.label, 0.0))} of the images from it)")

    beaten = [f"{s.load:g}x: {name} FD {_fd(f.mean_fd)} at {_pct(f.attainment)} attainment, {_pct(f.rejected)} "
              f"rejected; auto FD {_fd(s.mean_fd)}, {_pct(s.rejected)} rejected"
              for name, rows in results.items() if name != "auto"
              for s, f in zip(auto, rows)
              if f.attainment is not None and f.attainment >= TARGET and f.mean_fd is not None
              and (s.mean_fd is None or s.mean_fd > f.mean_fd)]
    lines.append(f"- at every load level auto's mean FD is at most that of every fixed choice holding >= {TARGET:.0%}: "
                 f"{met(not beaten)}" + (" (" + "; ".join(beaten) + ")" if beaten else ""))

    reasons = Counter()
    for s in auto:
        reasons.update(s.rejections)
    lines.append(f"- auto rejects only when no candidate could meet the SLO: {met(not needless)} "
                 f"({sum(reasons.values())} rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
                 + f"; {len(needless)} of them answered in time, in its own run, by a fixed choice their tier "
                 f"allows, of: {', '.join(n for n in results if n != 'auto')})")
    return lines


def markdown(results: dict[str, list[StageResult]], simulated: list[Summary], catalog: Catalog,
             needless: list[dict[str, Any]], missed: dict[str, Any], info: dict[str, Any]) -> str:
    head = (f"The latency/quality policy under a Poisson ramp through Ray Serve: one app, five models at "
            f"{MODEL_CPUS} CPU each on a 2-CPU Ray, started afresh for each strategy; {info['stage_s']:g} s per "
            f"load level (+ 5 s warm-up), SLOs "
            f"{', '.join(f'{s:g}' for s in SLOS_MS)} ms x tiers none / standard / best x 10 classes, equally likely, "
            f"one image each; the same schedule for every strategy.\n\n"
            f"Diffusion path capacity: {info['raw_rows_per_s_at_64']:,.0f} rows/s (raw ONNX Runtime at batch 64, one "
            f"thread, measured before the run) / ({CAPACITY_STEPS} steps x 2 rows, guided dpmpp_2m/{CAPACITY_STEPS}) "
            f"= {info['capacity_rps']:.2f} req/s.\n")
    table = ["| load (x capacity) | offered req/s | strategy | requests | rejected | SLO met (admitted) | mean FD "
             "| mean class acc. | choices (share of images) |", "|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for i, load_x in enumerate(LOADS):
        for name, rows in results.items():
            s = rows[i]
            choices = ", ".join(f"{label} {share:.0%}" for label, share in s.choices.items()) if name == "auto" else ""
            table.append(f"| {load_x:g} | {s.offered_rps:g} | {name} | {s.requests} | {_pct(s.rejected)} | "
                         f"{_pct(s.attainment)} | {_fd(s.mean_fd)} | {_pct(s.mean_accuracy)} | {choices} |")
    sim = ["| load (x capacity) | rejected, real / simulated | SLO met (admitted), real / simulated "
           "| mean FD, real / simulated |", "|---:|---:|---:|---:|"]
    for s, m in zip(results["auto"], simulated):
        sim.append(f"| {s.load:g} | {_pct(s.rejected)} / {_pct(m.rejected)} | {_pct(s.attainment)} / "
                   f"{_pct(m.attainment)} | {_fd(s.mean_fd)} / {_fd(m.mean_fd)} |")
    unmeasured = [name for name in results if name != "auto" and catalog.fixed(name).quality is None]
    notes = [f"FD —: the setting has no measured quality ({', '.join(unmeasured)})."] if unmeasured else []
    return "\n".join([
        head, "## Per load level and strategy", "", *table, "", *notes, "",
        "## Targets", "", *verdicts(results, catalog, needless, missed), "",
        "## Simulator vs the real run (auto)", "",
        f"The auto run's requests replayed through serving/policy/simulator.py at their send times, with the "
        f"same manifests; its forwards take the profile x {info['sim_slowdown']:.2f} (the raw diffusion forward "
        f"at batch 64 measured here / the manifest's) and {SimConfig().overhead_ms:g} ms of hops. The simulator "
        f"times a request at the ingress; the real run at the client (HTTP proxy and PNG encoding included).", "",
        *sim, "", "![SLO attainment, rejections and mean FD vs offered load](policy.png)"])


def plot(results: dict[str, list[StageResult]], simulated: list[Summary], path: Path) -> None:
    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)

    def nan(x: float | None) -> float:
        return math.nan if x is None else x

    for name, rows in results.items():
        x = [s.load for s in rows]
        axes[0].plot(x, [nan(s.attainment) * 100 for s in rows], marker="o", label=name)
        axes[1].plot(x, [s.rejected * 100 for s in rows], marker="o", label=name)
        axes[2].plot(x, [nan(s.mean_fd) for s in rows], marker="o", label=name)
    x = [s.load for s in results["auto"]]
    for ax, values in zip(axes, ([m.attainment * 100 for m in simulated], [m.rejected * 100 for m in simulated],
                                 [m.mean_fd for m in simulated])):
        ax.plot(x, values, "k--", label="auto, simulated")
        ax.set_xscale("log")
        ax.set_xticks(LOADS, [f"{f:g}" for f in LOADS])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("offered load (x diffusion capacity)")
    axes[0].axhline(TARGET * 100, color="grey", lw=0.8, ls=":")
    axes[0].set_title("SLO attainment of admitted (%)")
    axes[1].set_title("rejected, 429 (%)")
    axes[2].set_title("mean FD of images served (lower is better)")
    axes[2].set_yscale("log")
    axes[2].yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axes[2].yaxis.set_major_formatter(ScalarFormatter())
    axes[2].yaxis.set_minor_formatter(NullFormatter())
    axes[2].legend(fontsize="small")
    fig.savefig(path, dpi=120, bbox_inches="tight")


# ---- the command -----------------------------------------------------------------------------------

def policy(store: str, out: Path, stage_s: float = 20.0, strategies: tuple[str, ...] = tuple(STRATEGIES),
           port: int = 8000) -> dict[str, Any]:
    models = store_models(store)
    catalog = Catalog(models)
    raw = raw_rows_per_second(store, "diffusion", batches=(MAX_ROWS,))[MAX_ROWS]
    capacity = raw / (2 * CAPACITY_STEPS)    # guided: two rows a step
    ramp = OpenLoop("poisson", tuple(Stage(round(f * capacity, 2), stage_s) for f in LOADS))
    runs = {}
    for name in strategies:  # each on a fresh app: what one taught the policy's fit and margin must not steer the next
        with serving([policy_app(store)], port) as url:
            runs[name] = load(url, out, "policy-" + name.replace(" ", "-").replace("/", "-"), mix(name), ramp,
                              timeout_s=30)
    results = {name: stage_results(run, catalog, capacity) for name, run in runs.items()}
    profile_ms = catalog.manifests["diffusion"].latency.ms_per_forward[ITERATIVE_GRAPH["diffusion"]][MAX_ROWS]
    slowdown = MAX_ROWS / raw * 1000 / profile_ms
    simulated = replay(runs["auto"], models, slowdown)
    needless = needless_rejections(runs, catalog)
    missed = {name: misses(run) for name, run in runs.items()}
    info = {"stage_s": stage_s, "raw_rows_per_s_at_64": raw, "capacity_rps": capacity, "sim_slowdown": slowdown,
            "slos_ms": SLOS_MS, "tiers": TIERS, "loads": LOADS,
            "versions": {m.name: m.manifest.version for m in models}}
    data = {**info, "results": {name: [asdict(s) for s in rows] for name, rows in results.items()},
            "simulated_auto": [asdict(m) for m in simulated], "needless_rejections": needless, "misses": missed,
            "verdicts": verdicts(results, catalog, needless, missed["auto"])}
    out.mkdir(parents=True, exist_ok=True)
    plot(results, simulated, out / "policy.png")
    write(out, "policy", markdown(results, simulated, catalog, needless, missed["auto"], info), data)
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.policy", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--store", default="model_store_data")
    parser.add_argument("--stage-s", type=float, default=None, help="seconds per load level (default 20; --quick 8)")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: 8 s levels, strategies {', '.join(QUICK)}")
    parser.add_argument("--port", type=int, default=8000, help="the app's HTTP port (default 8000)")
    parser.add_argument("--strategies", nargs="+", choices=tuple(STRATEGIES), default=None,
                        help="run only these (e.g. auto: its SLO attainment at the client alone)")
    parser.add_argument("--cascade", action="store_true",
                        help="the quality cascade's trade-off instead (benchmarks/cascade.py): cascade.md/json/png")
    args = parser.parse_args(argv)
    if args.cascade:
        from benchmarks.cascade import main as cascade

        return cascade(args.store, args.out, args.quick, args.stage_s)
    store = ModelStore.open(args.store)
    build(store, log=lambda line: print(line, flush=True))   # a no-op when the store is current
    stage_s = args.stage_s or (8.0 if args.quick else 20.0)
    strategies = tuple(args.strategies or (QUICK if args.quick else STRATEGIES))
    policy(store.uri, args.out, stage_s, strategies, args.port)


if __name__ == "__main__":
    main()
