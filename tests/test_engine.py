"""The step-batched engine: FCFS row-budget scheduling, batch-independent results (diffusion and PixelCNN),
parity with loop.sample, cancellation and deadlines under load, failures, metrics, the asyncio face, and
one run over a real ONNX Runtime session. Fake runners and a fake clock: no sleeps, no GPU."""

from __future__ import annotations

import asyncio
import math
import random
import threading

import pytest
import torch

from core.contracts import NULL_CLASS
from serving.engine import (AsyncEngine, DeadlineExceeded, DiffusionRequest, DiffusionStepper, EngineCore,
                            PixelCNNRequest, PixelCNNStepper, RequestCancelled, RequestFailed, Scheduler, Status,
                            TorchRunner)
from serving.engine.diffusion import to_uint8
from serving.engine.request import make_state
from serving.engine.scheduler import admit_fcfs
from core.samplers import linear_alphas_cumprod
from core.samplers.loop import sample

torch.set_num_threads(1)
ALPHAS = linear_alphas_cumprod()


# --- factories and fakes -------------------------------------------------------------------------

def diffusion(**kw) -> DiffusionRequest:
    return DiffusionRequest(**{"class_id": 3, "sampler": "ddim", "steps": 4, "seed": 0} | kw)


def pixelcnn(**kw) -> PixelCNNRequest:
    return PixelCNNRequest(**{"class_id": 3, "seed": 0} | kw)


def toy_denoiser(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Deterministic and per-row: the exact ε for data ~ N(μ_y, 0.25 I) plus a nonlinear term (as in
    test_samplers), so a row's output never depends on its batch-mates."""
    a = ALPHAS[t].view(-1, 1, 1, 1)
    mu = 0.5 * torch.cos(y.float()).view(-1, 1, 1, 1)
    x0 = mu + a.sqrt() * 0.25 / (0.25 * a + 1 - a) * (x - a.sqrt() * mu)
    return (x - a.sqrt() * x0) / (1 - a).sqrt() + 0.05 * torch.tanh(3 * x)


def logistic(level: torch.Tensor, log_scale: float) -> torch.Tensor:
    """[R] levels -> [R, 3] the step graph's output for one logistic (K = 1) centred on each level."""
    return torch.stack([torch.zeros_like(level), level / 127.5 - 1, torch.full_like(level, log_scale)], 1)


def toy_mixture(x: torch.Tensor, y: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Causal and per-row: pixel p's distribution peaks at a level set by pixel p-1, the class and p, so
    the image depends on every pixel sampled before (a fake PixelCNN step). [R,1,28,28], [R], [R] -> [R,3]."""
    flat = x.flatten(1)  # [R, 784]
    prev = torch.cat([torch.zeros_like(flat[:, :1]), flat[:, :-1]], 1).gather(1, p[:, None])[:, 0]  # [R]
    target = (prev * 0.5 + 10 * y + p) % 256  # [R]
    return logistic(target, math.log(3 / 127.5))  # a scale of 3 levels


class FakeRunner:
    """A torch function as a runner that records every forward: its inputs after x (t and y, or y)."""

    def __init__(self, fn=toy_denoiser, fail_at: int | None = None):
        self.fn, self.fail_at, self.calls = fn, fail_at, []

    def execute(self, x, *rest):
        self.calls.append([r.tolist() for r in rest])
        if self.fail_at == len(self.calls):
            raise RuntimeError("device lost")
        return self.fn(x, *rest)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def engine(runner=None, *, max_rows: int = 64, clock=None, family: str = "diffusion") -> EngineCore:
    if family == "diffusion":
        stepper = DiffusionStepper(runner or FakeRunner())
    else:
        stepper = PixelCNNStepper(runner or FakeRunner(toy_mixture))
    return EngineCore(stepper, max_rows=max_rows, **({"clock": clock} if clock else {}))


def run(core: EngineCore, arrivals: dict[int, list] | None = None, on_step=None) -> dict:
    """Step until idle; arrivals[k] = [(id, request)] are added before step k. -> id -> RequestOutput."""
    arrivals, outputs, k = dict(arrivals or {}), {}, 0
    while core.has_work() or arrivals:
        for request_id, request in arrivals.pop(k, []):
            core.add_request(request, request_id)
        if on_step:
            on_step(k, core)
        outputs |= {o.request_id: o for o in core.step()}
        k += 1
    return outputs


def alone(request, runner_fn=toy_denoiser, family="diffusion") -> torch.Tensor:
    return run(engine(FakeRunner(runner_fn), family=family), {0: [("a", request)]})["a"].result()


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same image to within 1/255 per pixel."""
    return a.shape == b.shape and (a.int() - b.int()).abs().max() <= 1


# --- requests --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(class_id=11), r"^class_id must be an integer in \[0, 10\] \(10 = no class\), got 11$"),
    (dict(sampler="euler"), r"^sampler must be one of \('ddim', 'dpmpp_2m'\), got 'euler'$"),
    (dict(steps=0), r"^steps must be an integer in \[1, 1000\], got 0$"),
    (dict(guidance_scale=-1.0), r"^guidance_scale must be a finite number >= 0, got -1.0$"),
    (dict(sampler="dpmpp_2m", eta=0.5), r"^eta applies only to the 'ddim' sampler, got eta=0.5 with 'dpmpp_2m'$"),
    (dict(n=0), r"^n must be an integer >= 1, got 0$"),
    (dict(seed=-1), r"^seed must be an integer in \[0, 2\*\*64 - 1\], got -1$"),
])
def test_diffusion_request_is_validated_on_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        diffusion(**kwargs)


def test_pixelcnn_request_is_validated_on_construction():
    with pytest.raises(ValueError, match=r"^temperature must be a finite number > 0, got 0.0$"):
        pixelcnn(temperature=0.0)


def test_guided_images_take_two_rows_and_unguided_or_unconditional_one():
    assert diffusion(n=3, guidance_scale=2.0).rows == 6
    assert diffusion(n=3, guidance_scale=1.0).rows == 3
    assert diffusion(n=3, guidance_scale=2.0, class_id=NULL_CLASS).rows == 3  # cond row == uncond row
    assert diffusion(n=3, guidance_scale=2.0, class_ids=(1, NULL_CLASS, 2)).rows == 5
    assert pixelcnn(n=3).rows == 3


# --- scheduler (no model) ----------------------------------------------------------------------------

def states(*requests):
    return [make_state(f"r{i}", r, 0.0) for i, r in enumerate(requests)]


def test_scheduler_admits_fcfs_up_to_the_row_budget_without_skipping():
    a, b, c = states(diffusion(n=2, steps=1), diffusion(n=3), diffusion(n=1))
    sched = Scheduler(max_rows=4)
    for s in (a, b, c):
        sched.add(s)
    plan = sched.schedule(now=0.0)
    # b (3 rows) does not fit beside a; c would, but FCFS never lets it overtake b
    assert [s.request_id for s in plan.requests] == plan.joined == ["r0"]
    assert (plan.num_rows, plan.num_waiting) == (2, 2)
    assert sched.update(plan) == [a] and a.status is Status.FINISHED
    plan = sched.schedule(now=0.0)  # a's rows are free at the very next step
    assert [s.request_id for s in plan.requests] == ["r1", "r2"] and plan.num_rows == 4


def test_scheduler_refuses_requests_wider_than_the_budget_and_duplicate_ids():
    sched = Scheduler(max_rows=4)
    with pytest.raises(ValueError, match=r"needs 6 rows per step \(n=3, x2 when guided\) but max_rows is 4"):
        sched.add(*states(diffusion(n=3, guidance_scale=2.0)))
    sched.add(*states(diffusion()))
    with pytest.raises(ValueError, match=r"^request id 'r0' is already in the engine$"):
        sched.add(*states(diffusion()))
    with pytest.raises(ValueError, match=r"^max_rows must be an integer >= 1, got 0$"):
        Scheduler(max_rows=0)


def test_scheduler_drops_cancelled_and_expired_requests_running_or_waiting():
    running, queued, late = states(diffusion(n=2), diffusion(n=2), diffusion(n=1, deadline=5.0))
    sched = Scheduler(max_rows=3)
    for s in (running, queued, late):
        sched.add(s)
    sched.schedule(now=0.0)  # running + late (1 row) fit; queued waits
    sched.abort("r0")
    plan = sched.schedule(now=5.0)
    assert [(s.request_id, s.status) for s in plan.dropped] == [("r0", Status.CANCELLED), ("r2", Status.EXPIRED)]
    assert [s.request_id for s in plan.requests] == ["r1"] and plan.joined == ["r1"]
    sched.abort("r0")  # already gone: ignored


def test_a_live_budget_cut_still_runs_a_queued_wide_request_alone():
    sched = Scheduler(max_rows=4)
    sched.add(*states(diffusion(n=4)))
    sched.max_rows = 2
    assert sched.schedule(now=0.0).num_rows == 4


def test_admission_takes_waiting_rows_in_order_while_they_fit():
    assert admit_fcfs(1, [1, 2, 1], max_rows=4) == 2   # the third no longer fits
    assert admit_fcfs(2, [3, 1], max_rows=4) == 0      # 3 rows block the 1 behind them
    assert admit_fcfs(0, [5, 1], max_rows=4) == 1      # an empty batch takes the head, even past a cut budget


# --- diffusion: results depend only on the request ----------------------------------------------------

@pytest.mark.parametrize("kw", [dict(sampler="ddim", eta=0.6, guidance_scale=2.5, n=2),
                                dict(sampler="dpmpp_2m", guidance_scale=3.0, steps=7),
                                dict(sampler="dpmpp_2m", guidance_scale=1.0, class_id=NULL_CLASS, steps=5)])
def test_one_request_alone_equals_loop_sample_with_the_same_seed(kw):
    """x_T = randn([n, 1, 28, 28], generator) from a generator seeded with the request's seed, and the
    DDIM noise then from that same generator, one randn([n, 1, 28, 28]) per step: as loop.sample."""
    request = diffusion(seed=42, **kw)
    g = torch.Generator().manual_seed(42)
    x_T = torch.randn((request.n, 1, 28, 28), generator=g)
    ref = sample(toy_denoiser, x_T, torch.full((request.n,), request.class_id), sampler=request.sampler,
                 steps=request.steps, guidance_scale=request.guidance_scale, null_class=NULL_CLASS,
                 eta=request.eta, generator=g, clip_x0=True)  # the engine clips x_0, as the families' sampler
    assert torch.equal(alone(request), to_uint8(ref))


# (arrival step, request): samplers, step counts, guidance, eta, n, classes and seeds all differ
MIX = [(0, diffusion(sampler="ddim", steps=10, guidance_scale=2.0, seed=1)),
       (0, diffusion(sampler="dpmpp_2m", steps=7, n=2, seed=2, class_id=0)),
       (1, diffusion(sampler="ddim", steps=5, eta=0.7, guidance_scale=3.0, seed=3, class_id=9)),
       (2, diffusion(sampler="dpmpp_2m", steps=12, guidance_scale=2.0, seed=4, class_id=NULL_CLASS)),
       (3, diffusion(sampler="dpmpp_2m", steps=3, guidance_scale=4.0, n=3, seed=5)),
       (5, diffusion(sampler="ddim", steps=4, eta=1.0, seed=6, class_id=7)),
       (8, diffusion(sampler="dpmpp_2m", steps=6, guidance_scale=1.5, seed=7, class_id=5))]


def test_a_request_gives_the_same_image_alone_and_inside_a_busy_mixed_batch():
    runner = FakeRunner()
    arrivals = {}
    for i, (k, r) in enumerate(MIX):
        arrivals.setdefault(k, []).append((f"m{i}", r))
    outputs = run(engine(runner), arrivals)
    for i, (_, r) in enumerate(MIX):
        assert close(outputs[f"m{i}"].result(), alone(r)), f"m{i}"
    assert len(runner.calls) == 14 < sum(r.steps for _, r in MIX)  # requests shared forwards
    assert len(runner.calls[5][0]) == sum(r.rows for _, r in MIX[:6])  # at step 5, six requests in one forward


def test_guided_requests_put_conditional_and_null_rows_in_the_same_forward():
    runner = FakeRunner()
    run(engine(runner), {0: [("g", diffusion(n=2, guidance_scale=2.0, class_id=4, steps=3)),
                             ("u", diffusion(n=1, class_id=6, steps=5))]})
    t_g, t_u = [999, 666, 332], [999, 799, 599, 399, 199]
    for k in range(3):
        assert runner.calls[k] == [[t_g[k]] * 4 + [t_u[k]], [4, 4, NULL_CLASS, NULL_CLASS, 6]]
    assert runner.calls[3] == [[t_u[3]], [6]]  # g finished: its rows left at once


# per-image seeds and classes (a KServe v2 request of n images is one such request)
PER_IMAGE = dict(class_ids=(4, NULL_CLASS, 4, 9), seeds=(5, 6, 5, 2**64 - 1))


@pytest.mark.parametrize("kw", [dict(sampler="ddim", eta=0.6, guidance_scale=2.5),
                                dict(sampler="dpmpp_2m", guidance_scale=3.0, steps=7),
                                dict(sampler="dpmpp_2m", guidance_scale=1.0, steps=5)])
def test_per_image_seeds_and_classes_give_each_image_as_its_one_image_request(kw):
    """Image i is the image of the 1-image request with seed seeds[i] and class class_ids[i], bit for bit:
    x_T and the DDIM noise come from each image's own generator, and a classless image takes one row."""
    request = diffusion(n=4, **PER_IMAGE, **kw)
    singles = [diffusion(class_id=c, seed=seed, **kw) for c, seed in zip(PER_IMAGE["class_ids"], PER_IMAGE["seeds"])]
    assert request.rows == sum(r.rows for r in singles)
    together = alone(request)
    assert torch.equal(together, torch.cat([alone(r) for r in singles]))
    assert torch.equal(together[0], together[2])  # the same seed and class: the same image, wherever it is
    # and inside a busy batch, beside requests of one seed
    outputs = run(engine(), {0: [("p", request), ("m", MIX[0][1])], 1: [("q", MIX[2][1])]})
    assert torch.equal(outputs["p"].result(), together)


@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
def test_pixelcnn_per_image_seeds_and_classes_give_each_image_as_its_one_image_request(guidance_scale):
    """As diffusion's: image i of a PixelCNN request with per-image seeds and classes is the image of the
    1-image request with seeds[i] and class_ids[i], bit for bit, alone and inside a busy batch."""
    kw = dict(guidance_scale=guidance_scale, temperature=0.9)
    request = pixelcnn(n=4, **PER_IMAGE, **kw)
    singles = [pixelcnn(class_id=c, seed=seed, **kw) for c, seed in zip(PER_IMAGE["class_ids"], PER_IMAGE["seeds"])]
    assert request.rows == sum(r.rows for r in singles)
    together = alone(request, toy_mixture, "pixelcnn")
    assert torch.equal(together, torch.cat([alone(r, toy_mixture, "pixelcnn") for r in singles]))
    assert torch.equal(together[0], together[2])
    outputs = run(engine(family="pixelcnn"), {0: [("p", request), ("m", pixelcnn(n=2, seed=3, **kw))]})
    assert torch.equal(outputs["p"].result(), together)


def test_per_image_rows_are_the_conditional_rows_then_the_guided_images_unconditional_ones():
    runner = FakeRunner()
    run(engine(runner), {0: [("p", diffusion(n=3, steps=1, guidance_scale=2.0, class_ids=(1, NULL_CLASS, 2),
                                             seeds=(1, 2, 3)))]})
    assert runner.calls == [[[999] * 5, [1, NULL_CLASS, 2, NULL_CLASS, NULL_CLASS]]]


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=2, seeds=(1,)), r"^seeds must be None or a tuple of n = 2 values, got \(1,\)$"),
    (dict(n=2, class_ids=[1, 2]), r"^class_ids must be None or a tuple of n = 2 values, got \[1, 2\]$"),
    (dict(n=2, class_ids=(1, 11)), r"^class_id must be an integer in \[0, 10\]"),
    (dict(n=2, seeds=(1, -1)), r"^seed must be an integer in \[0, 2\*\*64 - 1\], got -1$"),
])
def test_per_image_seeds_and_classes_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        diffusion(**kwargs)


def test_a_new_request_joins_at_the_next_step_and_never_waits_for_others():
    runner = FakeRunner()
    outputs = run(engine(runner), {0: [("long", diffusion(steps=20))], 3: [("short", diffusion(steps=2))]})
    assert [len(y) for _, y in runner.calls[2:6]] == [1, 2, 2, 1]  # joined at step 3, left after step 4
    assert outputs["short"].status is Status.FINISHED and len(runner.calls) == 20


# --- cancellation, deadlines, failures ------------------------------------------------------------------

def test_a_cancelled_request_frees_its_slot_for_a_waiting_one_and_the_rest_are_served():
    """Under load: 4 rows, four guided requests of 2 rows each; two run, two wait."""
    reqs = {f"r{i}": diffusion(guidance_scale=2.0, steps=6, seed=i, class_id=i) for i in range(4)}
    runner = FakeRunner()

    def cancel_r1(k, core):
        if k == 2:
            core.abort_request("r1")

    outputs = run(engine(runner, max_rows=4), {0: list(reqs.items())}, on_step=cancel_r1)
    with pytest.raises(RequestCancelled, match=r"^request r1 was cancelled after 2 of 6 steps$"):
        outputs["r1"].result()
    assert runner.calls[2][1] == [0, NULL_CLASS, 2, NULL_CLASS]  # r2 took r1's rows at the very next step
    for rid in ("r0", "r2", "r3"):
        assert close(outputs[rid].result(), alone(reqs[rid])), rid


def test_expired_requests_leave_at_the_next_step_running_or_queued():
    clock = Clock()
    core = engine(max_rows=2, clock=clock)
    core.add_request(diffusion(steps=10, deadline=clock.now + 2.5), "late")      # expires while running
    core.add_request(diffusion(steps=3, n=2, seed=1), "big")                     # waits for late's row...
    core.add_request(diffusion(steps=3, deadline=clock.now + 1.5), "queued")   # ...and expires behind big
    outputs = {}
    while core.has_work():
        outputs |= {o.request_id: o for o in core.step()}
        clock.now += 1.0
    with pytest.raises(DeadlineExceeded, match=r"^request late missed its deadline \(now 500 ms past it\) after 3 "):
        outputs["late"].result()
    assert outputs["queued"].status is Status.EXPIRED and outputs["queued"].error.steps_done == 0
    assert close(outputs["big"].result(), alone(diffusion(steps=3, n=2, seed=1)))
    assert (core.metrics.expired, core.metrics.finished) == (2, 1)


def test_a_failing_forward_fails_its_batch_and_the_engine_keeps_serving():
    core = engine(FakeRunner(fail_at=2))
    outputs = run(core, {0: [("a", diffusion()), ("b", diffusion(seed=1))], 3: [("c", diffusion(seed=2))]})
    for rid in ("a", "b"):
        with pytest.raises(RequestFailed, match=rf"^request {rid} failed: RuntimeError: device lost after 1 of 4"):
            outputs[rid].result()
        assert isinstance(outputs[rid].error.__cause__, RuntimeError)
    assert close(outputs["c"].result(), alone(diffusion(seed=2)))
    assert (core.metrics.failed, core.metrics.finished) == (2, 1)


def test_metrics_report_occupancy_queue_and_steps_in_flight():
    core = engine(max_rows=4)
    core.add_request(diffusion(n=1, guidance_scale=2.0, steps=5))   # 2 rows
    core.add_request(diffusion(n=1, steps=3))                       # 1 row
    core.add_request(diffusion(n=2, steps=4))                       # 2 rows: waits
    core.step()
    m = core.metrics
    assert (m.rows, m.max_rows, m.batch_occupancy, m.queue_length, m.running) == (3, 4, 0.75, 1, 2)
    assert (m.steps_in_flight, m.steps_queued, m.steps, m.row_steps, m.added) == (4 + 2, 4, 1, 3, 3)
    assert m.steps_per_second > 0 and m.row_steps_per_second == pytest.approx(3 * m.steps_per_second)
    while core.has_work():
        core.step()
    assert (m.finished, m.running, m.queue_length, m.batch_occupancy, m.steps_in_flight) == (3, 0, 0, 0.0, 0)


# --- the policy's simulator steps this scheduler ----------------------------------------------------------

def record_joins(sched: Scheduler, joins: list) -> None:
    """Note (now, request id) for every admission the scheduler makes."""
    schedule = sched.schedule

    def recording(now: float, step_s: float | None = None):
        plan = schedule(now, step_s)
        joins.extend((now, request_id) for request_id in plan.joined)
        return plan
    sched.schedule = recording


def test_the_policy_simulator_admits_and_steps_as_the_engine_does():
    """serving/policy/simulator.py's step replica and EngineCore, on one scenario where every forward takes
    1 ms + 0.5 ms per row (queues behind a full batch, pre-emptions, and idle gaps): the same admissions at
    the same times, the same ends."""
    from serving.policy.simulator import _Clock, _Engine, _Request

    def forward_ms(rows: int) -> float:
        return 1.0 + 0.5 * rows

    rng = random.Random(0)  # id, arrival (s), rows, steps; arrivals apart, as no two requests reach a replica at once
    scenario = sorted(((f"r{i}", rng.uniform(0, 0.1), rng.randint(1, 6), rng.randint(1, 8)) for i in range(12)),
                      key=lambda job: job[1])

    clock, sim_joins, sim_ends = _Clock(), [], {}
    replica = _Engine(clock, forward_ms, 6, lambda r: sim_ends.update({r.request_id: clock.now}))
    record_joins(replica.scheduler, sim_joins)
    for request_id, arrival, rows, steps in scenario:
        clock.at(arrival, lambda r=_Request(None, request_id, rows, rows, steps): replica.add(r))
    clock.run()

    class Timed:
        """The stepper, each forward advancing the fake clock by forward_ms(rows)."""

        def __init__(self, stepper):
            self.stepper, self.images = stepper, stepper.images

        def execute(self, plan):
            fake.now += forward_ms(plan.num_rows) / 1000
            return self.stepper.execute(plan)

        def update(self, plan, out):
            self.stepper.update(plan, out)

    fake, core_joins, core_ends = Clock(), [], {}
    fake.now = 0.0
    core = EngineCore(Timed(DiffusionStepper(FakeRunner())), max_rows=6, clock=fake)
    record_joins(core.scheduler, core_joins)
    pending = list(scenario)
    while pending or core.has_work():
        if not core.has_work():  # idle: the next request starts a step as it arrives
            fake.now = max(fake.now, pending[0][1])
        while pending and pending[0][1] <= fake.now:
            request_id, _, rows, steps = pending.pop(0)
            core.add_request(diffusion(n=rows, steps=steps), request_id)
        core_ends |= {o.request_id: fake.now for o in core.step()}

    assert [r for _, r in sim_joins] == [r for _, r in core_joins] and {r for _, r in sim_joins} == {s[0] for s in scenario}
    assert len(sim_joins) > len(scenario)  # long requests were pre-empted for short ones, and resumed, in both
    assert [t for t, _ in sim_joins] == pytest.approx([t for t, _ in core_joins])
    assert sim_ends == pytest.approx(core_ends)


# --- PixelCNN ----------------------------------------------------------------------------------------

def test_pixelcnn_feeds_each_sampled_pixel_back_in_raster_order():
    """The narrowest logistic on (pixel p-1) + 1, sharpened by a low temperature: the image must come out
    as 0, 1, 2, ... in raster order."""
    def next_level(x, y, p):
        prev = torch.cat([torch.full_like(x.flatten(1)[:, :1], -1), x.flatten(1)[:, :-1]], 1)
        return logistic((prev.gather(1, p[:, None])[:, 0] + 1) % 256, -7.0)  # 97% on its level, 1e-19 at T 0.1

    image = alone(pixelcnn(n=2, temperature=0.1), next_level, family="pixelcnn")
    assert image.dtype == torch.uint8 and image.shape == (2, 1, 28, 28)
    assert torch.equal(image, (torch.arange(784) % 256).reshape(1, 1, 28, 28).expand(2, -1, -1, -1).to(torch.uint8))


PIXEL_MIX = [(0, pixelcnn(seed=1)), (0, pixelcnn(n=2, temperature=0.7, seed=2, class_id=8)),
             (100, pixelcnn(temperature=1.5, seed=3, class_id=NULL_CLASS)), (500, pixelcnn(seed=4, class_id=1))]


def test_pixelcnn_requests_at_different_positions_share_forwards_and_match_alone():
    runner = FakeRunner(toy_mixture)
    arrivals = {}
    for i, (k, r) in enumerate(PIXEL_MIX):
        arrivals.setdefault(k, []).append((f"p{i}", r))
    outputs = run(engine(runner, family="pixelcnn"), arrivals)
    assert len(runner.calls) == 500 + 784 and max(len(y) for y, _ in runner.calls) == 5
    for i, (_, r) in enumerate(PIXEL_MIX):
        assert torch.equal(outputs[f"p{i}"].result(), alone(r, toy_mixture, "pixelcnn")), f"p{i}"


def test_a_real_pixelcnn_mixes_positions_and_matches_alone():
    """The families' Gated PixelCNN (tiny, random): it sees whole images with zeros past each row's
    position, so its masks must hide them; and a request's image must not depend on its batch-mate.
    (Its outputs differ by ~1e-7 across batch sizes: a sample could flip only on a CDF boundary.)"""
    from families.pixelcnn import Config, build

    torch.manual_seed(0)
    model = build(Config(hidden=8, dilations=(1, 2))).eval()
    x = torch.randint(0, 256, (1, 1, 28, 28)).float()
    junk = x.clone()
    junk.view(-1)[300:] = 255.0 - junk.view(-1)[300:]
    with torch.no_grad():  # pixel 300 (row 10, column 20): its mixture ignores it and everything after it
        y = torch.tensor([2])
        assert (model(x, y)[..., 10, 20] - model(junk, y)[..., 10, 20]).abs().max() < 1e-5

    a, b = pixelcnn(seed=11, class_id=2), pixelcnn(seed=12, class_id=NULL_CLASS, temperature=0.8)
    outputs = run(engine(TorchRunner(model.step), family="pixelcnn"), {0: [("a", a)], 300: [("b", b)]})
    for rid, request in (("a", a), ("b", b)):
        assert torch.equal(outputs[rid].result(), alone(request, TorchRunner(model.step).execute, "pixelcnn")), rid


# --- asyncio face ---------------------------------------------------------------------------------------

class GatedRunner(FakeRunner):
    """Pauses inside forward number `at` until released, and tells the event loop it got there."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.release = at, threading.Event()
        self.loop, self.reached = None, asyncio.Event()

    def execute(self, x, *rest):
        if len(self.calls) + 1 == self.at:
            self.loop.call_soon_threadsafe(self.reached.set)
            self.release.wait(timeout=30)
        return super().execute(x, *rest)


def test_async_engine_serves_concurrent_requests_and_survives_cancellations():
    async def main():
        runner = GatedRunner(at=3)
        runner.loop = asyncio.get_running_loop()
        clock = Clock()
        eng = AsyncEngine(engine(runner, max_rows=8, clock=clock))
        loop_task = asyncio.create_task(eng.run())
        keep = asyncio.create_task(eng.submit(diffusion(steps=6, seed=1)))
        gone = asyncio.create_task(eng.submit(diffusion(steps=6, seed=2), "gone"))          # client goes away
        told = asyncio.create_task(eng.submit(diffusion(steps=6, seed=3), "told"))          # engine.cancel
        late = asyncio.create_task(eng.submit(diffusion(steps=6, seed=4, deadline=clock.now + 1)))
        await asyncio.wait_for(runner.reached.wait(), 30)  # step 3's forward is running off the loop
        gone.cancel()
        eng.cancel("told")
        clock.now += 1
        joiner = asyncio.create_task(eng.submit(diffusion(steps=2, seed=5)))  # accepted mid-step
        runner.release.set()
        images = await asyncio.wait_for(keep, 30)
        with pytest.raises(asyncio.CancelledError):
            await gone
        with pytest.raises(RequestCancelled):
            await told
        with pytest.raises(DeadlineExceeded):
            await late
        assert close(images, alone(diffusion(steps=6, seed=1)))
        assert close(await asyncio.wait_for(joiner, 30), alone(diffusion(steps=2, seed=5)))
        m = eng.core.metrics
        assert (m.finished, m.cancelled, m.expired) == (2, 2, 1)
        assert runner.calls[3][1] == [3, 3]  # keep and joiner: the three others left together
        eng.stop()
        await asyncio.wait_for(loop_task, 30)

    asyncio.run(main())


# --- a real ONNX Runtime session ------------------------------------------------------------------------

def test_onnx_runtime_denoiser_from_the_store_gives_batch_independent_images(tmp_path):
    from exporters.onnx_export import export_family
    from core.runtime import ProviderChoice
    from families.checkpoint import config_to_dict
    from families.diffusion import Config, build
    from model_store.manifest import Manifest, SamplingSettings
    from model_store.store import ModelStore
    from serving.engine import OnnxRunner

    config = Config(channels=(8, 16, 16), emb_dim=16)
    torch.manual_seed(0)
    model = build(config).eval()
    with torch.no_grad():  # random weights everywhere: the zero-initialised output conv would make eps 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    graphs = export_family("diffusion", model, config_to_dict(config), tmp_path / "src", optimize=False,
                           threads=1, batches=(3,))
    store = ModelStore.open(tmp_path / "store")
    store.publish(tmp_path / "src", Manifest("tiny-diffusion", "v1", "diffusion", "2026-01-01T00:00:00+00:00",
                                             [g.contract for g in graphs], SamplingSettings(), {}), aliases=("latest",))
    runner = OnnxRunner.from_store(store, "tiny-diffusion@latest", "denoise", threads=1,
                                   choice=ProviderChoice(["CPUExecutionProvider"], "test"))

    mix = {"a": diffusion(sampler="ddim", steps=4, guidance_scale=2.0, seed=1),
           "b": diffusion(sampler="dpmpp_2m", steps=3, n=2, seed=2, class_id=NULL_CLASS),
           "c": diffusion(sampler="ddim", steps=5, eta=1.0, guidance_scale=3.0, seed=3, class_id=9)}
    outputs = run(EngineCore(DiffusionStepper(runner)), {0: list(mix.items())[:2], 1: list(mix.items())[2:]})
    for rid, request in mix.items():
        solo = run(EngineCore(DiffusionStepper(runner)), {0: [("x", request)]})["x"].result()
        assert close(outputs[rid].result(), solo), rid
        assert close(solo, alone(request, TorchRunner(model).execute)), rid  # ORT agrees with torch
