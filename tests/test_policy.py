"""The latency/quality policy (serving/policy/) on synthetic manifests and the simulator: no Ray, no models."""
from __future__ import annotations

import copy
import math
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from core.contracts import NULL_CLASS
from core.settings import SamplingSetting
from serving.engine.scheduler import Scheduler
from serving.engine.state import RequestState
from serving.policy import (Decision, Hints, LiveState, Outcome, Policy, PolicyConfig, Rejection, ServedModel,
                            candidates_of)
from serving.policy.latency import Work, play
from serving.policy.simulator import SimConfig, main, poisson_ramp, simulate, summarize, synthetic_models

BEST = "diffusion ddim/50 g=2.0"     # the synthetic models' best FD (40.0)


def models(**drop_settings: list[str]) -> list[ServedModel]:
    """The synthetic models; drop_settings: model -> setting keys whose metrics are removed (unmeasured)."""
    out = []
    for m in synthetic_models():
        if m.name in drop_settings:
            manifest = copy.deepcopy(m.manifest)
            for key in drop_settings[m.name]:
                del manifest.metrics["by_setting"][key]
            m = replace(m, manifest=manifest)
        out.append(m)
    return out


def policy(**config) -> Policy:
    return Policy(models(), PolicyConfig(**config))


def decide(p: Policy, now: float = 0.0, **hints) -> Decision | Rejection:
    """Hints from keyword arguments; sampler / steps / guidance_scale become its setting."""
    pinned = {k: hints.pop(k) for k in ("sampler", "steps", "guidance_scale") if k in hints}
    return p.decide(Hints(**hints, setting=SamplingSetting(**pinned)), now)


def key(sampler: str, steps: int) -> str:
    return SamplingSetting(sampler, steps, 2.0).key


# ---- candidates and quality ----------------------------------------------------------------------------------

def test_setting_keys_are_the_ones_evaluate_files_metrics_under():
    for s in ({}, {"temperature": 0.7}, {"sampler": "ddim", "steps": 50, "guidance_scale": 2.0}):
        assert SamplingSetting.from_dict(s).key == ("default" if not s else "-".join(f"{k}={v}" for k, v in sorted(s.items())))
    assert SamplingSetting("ddim", 50, 2.0).key == "guidance_scale=2.0-sampler=ddim-steps=50"   # the committed cards'


def test_candidates_are_every_allowed_setting_with_its_own_metrics():
    by_model = {m.name: candidates_of(m.name, m.manifest) for m in models()}
    assert [c.label for c in by_model["gan"]] == ["gan"]
    assert len(by_model["diffusion"]) == 6
    fds = {c.label: c.quality.fd for c in by_model["diffusion"]}
    assert fds["diffusion dpmpp_2m/10 g=2.0"] == 47.0 and fds[BEST] == 40.0
    assert by_model["pixelcnn"][0].steps() == 784 and by_model["diffusion"][0].steps() == 10


def test_an_unmeasured_setting_is_never_chosen_by_auto_but_served_when_asked():
    p = Policy(models(diffusion=[key("ddim", 50)]))
    assert next(c for c in p.candidates if c.label == BEST).quality is None
    d = decide(p, latency_slo_ms=5000)
    assert d.label == "diffusion dpmpp_2m/25 g=2.0"            # the best measured one
    d = decide(p, model="diffusion", sampler="ddim", steps=50, latency_slo_ms=5000)
    assert isinstance(d, Decision) and d.label == BEST and d.quality is None


def test_default_setting_falls_back_to_the_top_level_metrics():
    """Cards from before by_setting have only top-level metrics, which are the default setting's."""
    gan = models()[0]
    manifest = copy.deepcopy(gan.manifest)
    del manifest.metrics["by_setting"]
    assert candidates_of("gan", manifest)[0].quality.fd == 150.0


# ---- the decision --------------------------------------------------------------------------------------------

def test_tight_slo_gets_a_fast_family():
    d = decide(policy(), latency_slo_ms=20)
    assert d.model == "gan" and d.predicted_ms * d.margin <= 20
    assert "better but too slow: diffusion" in d.reason


def test_loose_slo_gets_the_best_diffusion_setting():
    d = decide(policy(), latency_slo_ms=5000)
    assert d.label == BEST and d.setting == SamplingSetting("ddim", 50, 2.0)
    assert d.units == 2 and d.steps == 50                     # guided: two rows per image
    assert d.reason.startswith(f"{BEST}: best quality in time (FD 40.0")


def test_a_middle_slo_gets_the_best_setting_that_fits():
    d = decide(policy(), latency_slo_ms=100)                  # ddim/50 alone takes ~155 ms
    assert d.family == "diffusion" and d.steps < 50
    assert all(not k.fits for k in d.considered[:-1]) and d.considered[-1].fits


def test_impossible_slo_is_rejected_429_without_retry_after():
    r = decide(policy(), latency_slo_ms=1)
    assert isinstance(r, Rejection) and r.reason == "slo_unattainable" and r.http_status == 429
    assert r.retry_after_s is None and "even on an idle replica" in r.message


@pytest.mark.parametrize("goal, families", [("likelihood", {"flow", "pixelcnn"}), ("latent", {"vae"})])
def test_goal_restricts_the_families(goal, families):
    for slo in (20, 500, 5000):
        d = decide(policy(), goal=goal, latency_slo_ms=slo)
        assert d.family in families and {k.label.split()[0] for k in d.considered} <= families


def test_tiers_are_floors():
    d = decide(policy(), tier="standard", latency_slo_ms=20)  # gan is the only candidate with acc >= 0.8 in time
    assert d.model == "gan"
    d = decide(policy(), tier="best", latency_slo_ms=5000)
    assert d.label == BEST and all(k.fd <= 40.0 * 1.1 for k in d.considered)
    assert isinstance(decide(policy(), tier="best", latency_slo_ms=20), Rejection)
    r = decide(policy(), max_fd=30, latency_slo_ms=5000)
    assert isinstance(r, Rejection) and r.reason == "no_candidate" and r.http_status == 400


def test_pinned_settings_restrict_auto():
    d = decide(policy(), steps=25, latency_slo_ms=5000)
    assert d.label == "diffusion dpmpp_2m/25 g=2.0"           # better than ddim/25


def test_classless_requests_take_one_row_and_too_wide_ones_skip_the_engine():
    assert decide(policy(), class_id=NULL_CLASS, latency_slo_ms=5000).units == 1
    d = decide(policy(), n=40, latency_slo_ms=5000)            # 80 guided rows > the 64-row budget
    assert d.family != "diffusion" and math.isinf(d.considered[0].predicted_ms)


def test_best_effort_gets_the_fastest_candidate():
    d = decide(policy(), latency_slo_ms=1, best_effort=True)
    assert isinstance(d, Decision) and d.best_effort
    assert d.predicted_ms == min(k.predicted_ms for k in d.considered)
    assert d.reason.startswith(f"{d.label}: best effort")


def test_explicit_model_bypasses_the_choice_but_not_admission():
    p = policy()
    d = decide(p, model="gan", latency_slo_ms=5000)
    assert d.model == "gan" and len(d.considered) == 1 and "requested" in d.reason
    d = decide(p, model="diffusion", steps=30, latency_slo_ms=5000)
    assert d.setting.steps == 30 and d.setting.sampler == "dpmpp_2m"
    r = decide(p, model="pixelcnn", latency_slo_ms=500)        # 784 steps: ~1.4 s even alone
    assert isinstance(r, Rejection) and r.http_status == 429
    with pytest.raises(ValueError, match="unknown model"):
        decide(p, model="nope")


# ---- admission: the ledger -----------------------------------------------------------------------------------

def test_a_burst_cannot_overcommit_the_step_engine():
    """200 diffusion requests within 50 ms: some are turned away at once, and every admitted one is in time."""
    burst = [(i * 0.00025, Hints(model="diffusion", latency_slo_ms=500)) for i in range(200)]
    results = simulate(policy(), burst, SimConfig(noise=0.02))
    admitted = [r for r in results if r.admitted]
    assert 10 < len(admitted) < 200
    assert all(r.met for r in admitted)
    assert {r.outcome.reason for r in results if not r.admitted} == {"overloaded"}


def test_each_admission_is_predicted_behind_the_ones_before():
    p = policy()
    first, second = (decide(p, model="diffusion", latency_slo_ms=5000) for _ in range(2))
    assert second.predicted_ms > first.predicted_ms
    assert p._admitted[first.ticket].expected_ms > first.predicted_ms  # the second one's rows slow it down


def test_retry_after_is_when_the_admitted_work_has_drained_enough():
    p = policy()
    admitted = [decide(p, model="diffusion", latency_slo_ms=2000) for _ in range(100)]
    assert isinstance(admitted[-1], Rejection)                 # 2 s of engine work are full
    r = decide(p, model="diffusion", latency_slo_ms=300)
    assert isinstance(r, Rejection) and r.reason == "overloaded"
    assert 0 < r.retry_after_s < 2.0
    assert isinstance(decide(p, r.retry_after_s / 2, model="diffusion", latency_slo_ms=300), Rejection)
    assert isinstance(decide(p, r.retry_after_s + 0.01, model="diffusion", latency_slo_ms=300), Decision)


def test_finishing_frees_the_ledger():
    p = policy()
    d = decide(p, model="diffusion", latency_slo_ms=5000)
    busy = decide(p, 0.001, model="diffusion", latency_slo_ms=5000).predicted_ms
    p.finish(d.ticket, 0.002)
    assert decide(p, 0.002, model="diffusion", latency_slo_ms=5000).predicted_ms < busy


def test_live_state_adds_load_the_ledger_does_not_know():
    p = policy()
    idle = decide(p, model="diffusion", latency_slo_ms=5000)
    p.finish(idle.ticket, 0.01)
    p.observe_live("diffusion", LiveState(0.01, running_units=60, running_requests=30, running_steps=30 * 40))
    busy = decide(p, 0.01, model="diffusion", latency_slo_ms=5000)
    assert busy.predicted_ms > 3 * idle.predicted_ms
    p.finish(busy.ticket, 0.02)
    p.observe_live("diffusion", LiveState(0.02))              # the replica emptied: the anonymous load goes
    assert decide(p, 0.02, model="diffusion", latency_slo_ms=5000).predicted_ms < 1.2 * idle.predicted_ms


# ---- online correction ---------------------------------------------------------------------------------------

def test_online_correction_follows_a_slowdown():
    p = policy()
    before = decide(p, model="diffusion", latency_slo_ms=5000)
    p.finish(before.ticket, before.predicted_ms / 1000)        # as predicted: nothing to correct
    now = 1.0
    for _ in range(40):                                        # then the machine runs at half speed
        d = decide(p, now, model="diffusion", latency_slo_ms=5000)
        now += 2 * before.predicted_ms / 1000
        p.finish(d.ticket, now)
    after = decide(p, now, model="diffusion", latency_slo_ms=5000)
    assert 1.8 < after.predicted_ms / before.predicted_ms < 2.1
    assert 1.8 < p.loads["diffusion"].fit.factor < 2.1
    assert p.loads["gan"].fit.factor == 1.0                   # per model


def test_the_simulated_slowdown_is_learnt_and_met():
    p = policy()
    results = simulate(p, poisson_ramp([20], 5.0, [500, 2000], seed=3), SimConfig(slowdown=2.0))
    assert 1.7 < p.loads["diffusion"].fit.factor < 2.3
    late = [r for r in results[len(results) // 2:] if r.admitted]
    assert sum(r.met for r in late) / len(late) >= 0.99


def test_margin_follows_prediction_errors():
    p = policy()
    assert p.loads["gan"].margin.value == 1.2                 # the prior
    for i in range(50):
        d = decide(p, i, model="gan", latency_slo_ms=5000)
        p.finish(d.ticket, i + 1.5 * d.predicted_ms / 1000 if i % 10 == 0 else i + d.predicted_ms / 1000)
    assert p.loads["gan"].margin.value > 1.2                  # one in ten came 1.5x late


# ---- counters ------------------------------------------------------------------------------------------------

def test_counters():
    p = policy()
    ok, late, gone = (decide(p, model="gan", latency_slo_ms=100) for _ in range(3))
    decide(p, latency_slo_ms=1)
    p.finish(ok.ticket, 0.01)
    p.finish(late.ticket, 0.1, Outcome.EXPIRED)
    finished = p.finish(gone.ticket, 0.01, Outcome.CANCELLED)
    assert not finished.met and finished.actual_ms == pytest.approx(10)
    s = p.stats
    assert s.decisions == {"gan": 3} and s.rejections == {"slo_unattainable": 1}
    assert s.slo_met == {"gan": 1} and s.slo_missed == {"gan": 1} and s.abandoned == {"gan": 1}


# ---- the engine's own admission -------------------------------------------------------------------------------

def scheduler_finishes(jobs: list[tuple[float, int, int]], budget: int, step_ms) -> dict[int, float]:
    """When each job (arrival ms, rows, steps) ends, in ms, served by the engine's Scheduler one step at a
    time, each step taking step_ms(rows); an idle engine steps as soon as a request arrives."""
    pending = sorted(enumerate(jobs), key=lambda job: job[1][0])
    sched, t, finished = Scheduler(budget), 0.0, {}
    while pending or sched.running or sched.waiting:
        if not (sched.running or sched.waiting):
            t = max(t, pending[0][1][0])
        while pending and pending[0][1][0] <= t:
            i, (arrival, rows, steps) = pending.pop(0)
            sched.add(RequestState(str(i), rows, rows, steps, arrival))
        plan = sched.schedule(t)
        t += step_ms(plan.num_rows)
        finished |= {int(s.request_id): t for s in sched.update(plan)}
    return finished


@pytest.mark.parametrize("seed", range(20))
def test_the_latency_model_replays_the_engines_admission(seed):
    """latency.play jumps over whole runs of steps, but admits with the scheduler's own rule: on random
    arrivals, widths and step counts, every request ends when the Scheduler stepped one step at a time
    ends it."""
    rng = random.Random(seed)
    jobs = [(rng.uniform(0, 100), rng.randint(1, 8), rng.randint(1, 12)) for _ in range(30)]

    def step_ms(rows: int) -> float:
        return 1.0 + 0.25 * rows

    ledger = [Work(i, rows, steps, arrival / 1000) for i, (arrival, rows, steps) in
              sorted(enumerate(jobs), key=lambda job: job[1][0])]
    replayed = play(ledger, iterative=True, budget=8, step_ms=step_ms, max_wait_ms=0.0, origin=0.0)
    assert replayed == pytest.approx(scheduler_finishes(jobs, 8, step_ms))


def test_the_policy_and_the_scheduler_import_without_torch():
    """The ingress never imports torch, and its policy admits with the engine's scheduler."""
    code = ("import sys, serving.policy.simulator, serving.engine.scheduler, serving.engine\n"
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# ---- the simulator -------------------------------------------------------------------------------------------

def test_auto_meets_its_slos_across_a_ramp():
    rates = [5, 50, 200]
    results = simulate(policy(), poisson_ramp(rates, 3.0, [100, 500, 2000], seed=1))
    for i in range(len(rates)):
        level = summarize([r for r in results if 3 * i <= r.arrival < 3 * (i + 1)])
        assert level.attainment >= 0.99 and level.rejected == 0.0


def test_quality_at_low_load_is_the_best_candidates():
    results = simulate(policy(), poisson_ramp([2], 5.0, [2000], seed=2))
    assert {r.outcome.label for r in results} == {BEST}
    assert summarize(results).mean_fd == 40.0


def test_simulator_cli_prints_the_comparison(capsys):
    main(["--rates", "5", "--level-seconds", "1"])
    table = capsys.readouterr().out
    assert "| 5 | auto |" in table and "| 5 | pixelcnn |" in table and "SLO met (admitted)" in table


def test_one_stall_cannot_lock_a_model_out():
    """A real ramp showed it: one 7x stall made the margin the worst ratio, every request infeasible, and
    nothing then corrected it. A ratio now counts at most 4x, and ratios expire after the horizon."""
    from serving.policy.latency import Margin

    margin = Margin(prior=1.2, quantile=0.99, window=200, min_samples=20, max_ratio=4.0, horizon_s=60.0)
    margin.observe(17.0, now=0.0)
    assert margin.value == 4.0
    margin.expire(now=30.0)
    assert margin.value == 4.0
    margin.expire(now=61.0)
    assert margin.value == 1.2          # a quiet model is back at its prior


# ---- a request without an SLO --------------------------------------------------------------------------------

def test_a_request_without_an_slo_is_held_to_the_default_and_refused_past_capacity():
    """No latency_slo_ms: the default SLO (3 s, or 10x the time alone for long work), admitted against like any
    SLO: a burst far past capacity is partly refused at once, and every admitted request is in time."""
    p = policy()
    d = decide(p, model="diffusion", steps=20)
    assert d.slo_ms == PolicyConfig.default_slo_ms
    long = decide(p, model="pixelcnn")  # 784 steps: its time alone x 4 is over the floor
    alone = decide(policy(), model="pixelcnn", latency_slo_ms=10**6).predicted_ms
    assert long.slo_ms == pytest.approx(PolicyConfig.default_slo_idle * alone, rel=0.01)
    assert long.slo_ms > PolicyConfig.default_slo_ms
    burst = [(i * 0.001, Hints(model="diffusion")) for i in range(400)]
    results = simulate(policy(), burst, SimConfig(noise=0.02))
    admitted = [r for r in results if r.admitted]
    assert 10 < len(admitted) < 400 and all(r.met for r in admitted)
    refused = next(r.outcome for r in results if not r.admitted)
    assert refused.reason == "overloaded" and "(the default: the request set none)" in refused.message


# ---- the quality cascade (serving/api/cascade.py plans with these) -------------------------------------------

def test_a_cascade_admits_stage_one_and_plans_stage_two_for_every_image():
    p = policy()
    d = p.decide_cascade(Hints(n=4, class_id=3, latency_slo_ms=2000), judge_ms=10.0, now=0.0)
    assert d.model == "gan" and d.escalation.label == BEST        # the best stage 2 fits the worst case
    assert d.escalation.predicted_ms <= 2000 and d.escalation.judge_ms == 10.0
    assert [w.units for w in p.loads["gan"].work] == [4] and not p.loads["diffusion"].work  # stage 2 not held
    assert p.finish(d.ticket, 0.01).met


def test_a_cascade_whose_worst_case_misses_the_slo_is_not_planned():
    """The GAN alone fits 30 ms; with the judge and any diffusion setting for both images it does not."""
    p = policy()
    ask = Hints(n=2, class_id=3, latency_slo_ms=30)
    assert p.decide_cascade(ask, judge_ms=10.0, now=0.0) is None and not p.loads["gan"].work


def test_an_escalation_takes_the_best_stage_two_in_time_or_is_not_started():
    p = policy()
    first = p.decide_cascade(Hints(n=1, class_id=3, latency_slo_ms=2000), judge_ms=10.0, now=0.0)
    roomy = p.escalate(first, Hints(n=1, class_id=3, latency_slo_ms=1900), 0.05)
    assert isinstance(roomy, Decision) and roomy.label == BEST and roomy.reason.startswith("cascade stage 2")
    late = p.escalate(first, Hints(n=1, class_id=3, latency_slo_ms=15), 0.05)
    assert isinstance(late, str) and late.startswith("no time") and "the 15 ms left" in late
    # stage 2 is diffusion only: PixelCNN's class accuracy is under the GAN's
    assert {c.label.split()[0] for c in roomy.considered} == {"diffusion"}
