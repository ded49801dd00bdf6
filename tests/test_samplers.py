"""Sampler step maths against diffusers (the numerical oracle), per-sample independence, validation."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import diffusers  # the numerical oracle; a test-only dependency
import pytest
import torch

from core.samplers import (FINAL_TIMESTEP, DPMSolverState, alphas_at, ddim_step, dpm_solver_pp_2m_step,
                              inference_timesteps, linear_alphas_cumprod)
from core.samplers import classifier_free_guidance
from core.samplers.loop import sample

# diffusers' own numpy-2 deprecation noise, not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SHAPE = (2, 1, 4, 4)  # tiny: the maths is elementwise, size adds nothing
NULL = 10
SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                prediction_type="epsilon", timestep_spacing="trailing")
ATOL = 1e-5


def toy_denoiser(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Deterministic and elementwise (so batch-invariant): the exact ε for data ~ N(μ_y, 0.25 I),
    plus a small nonlinear term; exact-ish keeps trajectories O(1), as with a trained model."""
    a = linear_alphas_cumprod()[t].view(-1, 1, 1, 1)
    mu = 0.5 * torch.cos(y.float()).view(-1, 1, 1, 1)
    x0 = mu + a.sqrt() * 0.25 / (0.25 * a + 1 - a) * (x - a.sqrt() * mu)  # E[x_0 | x_t]
    return (x - a.sqrt() * x0) / (1 - a).sqrt() + 0.05 * torch.tanh(3 * x)


def wide_denoiser(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """As toy_denoiser for data of mean ±1.5: its x_0 predictions leave [-1, 1], so clipping engages."""
    a = linear_alphas_cumprod()[t].view(-1, 1, 1, 1)
    mu = 1.5 * torch.cos(y.float()).view(-1, 1, 1, 1)
    x0 = mu + a.sqrt() * 0.25 / (0.25 * a + 1 - a) * (x - a.sqrt() * mu)
    return (x - a.sqrt() * x0) / (1 - a).sqrt()


def x_T(seed: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def per_row(value, b=SHAPE[0], dtype=None) -> torch.Tensor:
    return torch.full((b,), value, dtype=dtype)


def step_alphas(timesteps: list[int], i: int, b=SHAPE[0]) -> tuple[torch.Tensor, torch.Tensor]:
    ac = linear_alphas_cumprod()
    t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else FINAL_TIMESTEP
    return alphas_at(ac, per_row(timesteps[i], b, torch.int64)), alphas_at(ac, per_row(t_prev, b, torch.int64))


# --- schedule ---------------------------------------------------------------------------------

def test_alphas_cumprod_and_timesteps_match_diffusers():
    sched = diffusers.DDIMScheduler(**SCHEDULE)
    assert torch.equal(linear_alphas_cumprod(), sched.alphas_cumprod)
    for n in (1, 10, 25, 50, 1000):
        sched.set_timesteps(n)
        assert inference_timesteps(n) == sched.timesteps.tolist()


def test_inference_timesteps_are_n_distinct_descending_from_999():
    for n in range(1, 1001):
        ts = inference_timesteps(n)
        assert len(ts) == n and ts[0] == 999 and ts[-1] >= 0
        assert all(a > b for a, b in zip(ts, ts[1:]))


@pytest.mark.parametrize("bad", [0, 1001, 2.0, True, "10"])
def test_inference_timesteps_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match=r"^num_steps must be an integer in \[1, 1000\], got "):
        inference_timesteps(bad)


# --- step for step against diffusers -----------------------------------------------------------

@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_matches_diffusers(steps, eta):
    sched = diffusers.DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(steps)
    timesteps = inference_timesteps(steps)
    gen = torch.Generator().manual_seed(1)
    ours = ref = x_T(0)
    for i, t in enumerate(timesteps):
        t_b = per_row(t, dtype=torch.int64)
        noise = torch.randn(SHAPE, generator=gen) if eta > 0 else None
        ref = sched.step(toy_denoiser(ref, t_b, t_b * 0), t, ref, eta=eta, variance_noise=noise).prev_sample
        ours = ddim_step(ours, toy_denoiser(ours, t_b, t_b * 0), *step_alphas(timesteps, i), per_row(eta), noise)
        assert (ours - ref).abs().max() < ATOL, f"step {i}"


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
def test_dpm_solver_pp_2m_matches_diffusers(steps, lower_order_final, final_sigmas_type):
    sched = diffusers.DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="dpmsolver++", solver_order=2,
                                                  lower_order_final=lower_order_final,
                                                  final_sigmas_type=final_sigmas_type)
    sched.set_timesteps(steps)
    timesteps = inference_timesteps(steps)
    ours = ref = x_T(0)
    state = DPMSolverState.initial(ours)
    for i, t in enumerate(timesteps):
        t_b = per_row(t, dtype=torch.int64)
        ref = sched.step(toy_denoiser(ref, t_b, t_b * 0), t, ref).prev_sample
        alpha_t, alpha_prev = step_alphas(timesteps, i)
        last = i == steps - 1
        if final_sigmas_type == "sigma_min" and last:
            alpha_prev = alphas_at(linear_alphas_cumprod(), per_row(0, dtype=torch.int64))  # final σ = σ(t=0)
        lower_order = per_row(last and lower_order_final and steps < 15)  # diffusers' rule
        ours, state = dpm_solver_pp_2m_step(ours, toy_denoiser(ours, t_b, t_b * 0), alpha_t, alpha_prev,
                                            state, lower_order)
        assert (ours - ref).abs().max() < ATOL, f"step {i}"


def diffusers_loop(sched, x, y, steps, guidance_scale):
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        t_b = t.repeat(x.shape[0])
        eps_c, eps_u = toy_denoiser(x, t_b, y), toy_denoiser(x, t_b, torch.full_like(y, NULL))
        x = sched.step(eps_u + guidance_scale * (eps_c - eps_u), t, x).prev_sample
    return x


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_sample_loop_with_guidance_matches_diffusers(sampler):
    sched = (diffusers.DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=True) if sampler == "ddim"
             else diffusers.DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="dpmsolver++", solver_order=2))
    y = torch.tensor([3, 7])
    calls = []

    def counting_denoiser(x, t, y_):
        calls.append(x.shape[0])
        return toy_denoiser(x, t, y_)

    ours = sample(counting_denoiser, x_T(0), y, sampler=sampler, steps=10, guidance_scale=2.5, null_class=NULL)
    ref = diffusers_loop(sched, x_T(0), y, 10, 2.5)
    assert (ours - ref).abs().max() < ATOL
    assert calls == [2 * SHAPE[0]] * 10  # cond and uncond rows in ONE forward per step


def test_sample_with_guidance_one_is_a_plain_conditional_forward():
    calls = []

    def counting_denoiser(x, t, y):
        calls.append(y.tolist())
        return toy_denoiser(x, t, y)

    sample(counting_denoiser, x_T(0), torch.tensor([3, 7]), sampler="ddim", steps=3, guidance_scale=1.0,
           null_class=NULL)
    assert calls == [[3, 7]] * 3


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_clipped_x0_matches_diffusers_clip_sample_and_thresholding(sampler):
    """clip_x0 is diffusers' DDIM clip_sample (with use_clipped_model_output), and DPM-Solver++ thresholding with sample_max_value 1
    (whose dynamic threshold is then exactly a clamp to [-1, 1])."""
    if sampler == "ddim":
        sched = diffusers.DDIMScheduler(**SCHEDULE, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True)
    else:
        sched = diffusers.DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="dpmsolver++", solver_order=2,
                                                      thresholding=True, sample_max_value=1.0)
    sched.set_timesteps(10)
    timesteps = inference_timesteps(10)
    y = torch.zeros(SHAPE[0], dtype=torch.int64)  # mean +1.5: most x_0 predictions are clipped
    ours = unclipped = ref = x_T(0)
    state = unclipped_state = DPMSolverState.initial(ours)
    for i, t in enumerate(timesteps):
        t_b = per_row(t, dtype=torch.int64)
        kwargs = {"use_clipped_model_output": True} if sampler == "ddim" else {}  # ε re-derived from the clip
        ref = sched.step(wide_denoiser(ref, t_b, y), t, ref, **kwargs).prev_sample
        alphas = step_alphas(timesteps, i)
        if sampler == "ddim":
            ours = ddim_step(ours, wide_denoiser(ours, t_b, y), *alphas, per_row(0.0), None, clip_x0=True)
            unclipped = ddim_step(unclipped, wide_denoiser(unclipped, t_b, y), *alphas, per_row(0.0), None)
        else:
            last = per_row(i == 9)
            ours, state = dpm_solver_pp_2m_step(ours, wide_denoiser(ours, t_b, y), *alphas, state, last, clip_x0=True)
            unclipped, unclipped_state = dpm_solver_pp_2m_step(unclipped, wide_denoiser(unclipped, t_b, y), *alphas,
                                                               unclipped_state, last)
        assert (ours - ref).abs().max() < ATOL, f"step {i}"
    assert (ours - unclipped).abs().max() > 0.1  # the clip did engage
    assert ours.abs().max() <= 1.0 + ATOL       # and the final x_0 is in the data range


# --- per-sample independence -----------------------------------------------------------------

# (sampler, steps, eta, guidance, start iteration): rows join late, run different lengths and samplers
ROWS = [("ddim", 10, 0.0, 2.0, 0), ("dpmpp_2m", 7, 0.0, 1.0, 0), ("ddim", 5, 0.7, 3.0, 2),
        ("dpmpp_2m", 12, 0.0, 2.0, 3), ("dpmpp_2m", 3, 0.0, 4.0, 1), ("ddim", 4, 1.0, 1.0, 5)]


def test_mixed_batch_matches_each_row_alone():
    """A mini step-batched engine: each iteration ONE forward over all active rows (cond + uncond),
    then each sampler's step on its rows; every row must come out as if it had run alone."""
    n = len(ROWS)
    one = (1, *SHAPE[1:])
    ac = linear_alphas_cumprod()
    x = [x_T(100 + r, one) for r in range(n)]
    y = [torch.tensor([r % 10]) for r in range(n)]
    gens = [torch.Generator().manual_seed(200 + r) for r in range(n)]
    states = [DPMSolverState.initial(x[r]) for r in range(n)]
    done = [0] * n
    timesteps = [inference_timesteps(steps) for _, steps, *_ in ROWS]

    for it in range(max(start + steps for _, steps, _, _, start in ROWS)):
        active = [r for r, (_, steps, _, _, start) in enumerate(ROWS) if start <= it and done[r] < steps]
        t = torch.tensor([timesteps[r][done[r]] for r in active])
        t_prev = torch.tensor([timesteps[r][done[r] + 1] if done[r] + 1 < ROWS[r][1] else FINAL_TIMESTEP
                               for r in active])
        xb, yb = torch.cat([x[r] for r in active]), torch.cat([y[r] for r in active])
        eps = toy_denoiser(torch.cat([xb, xb]), torch.cat([t, t]), torch.cat([yb, torch.full_like(yb, NULL)]))
        eps = classifier_free_guidance(*eps.chunk(2), torch.tensor([ROWS[r][3] for r in active]))
        alpha_t, alpha_prev = alphas_at(ac, t), alphas_at(ac, t_prev)

        for sampler in ("ddim", "dpmpp_2m"):
            idx = [i for i, r in enumerate(active) if ROWS[r][0] == sampler]  # positions in the batch
            rows = [active[i] for i in idx]
            if not rows:
                continue
            if sampler == "ddim":
                noise = torch.cat([torch.randn(one, generator=gens[r]) if ROWS[r][2] > 0 else torch.zeros(one)
                                   for r in rows])
                x_new = ddim_step(xb[idx], eps[idx], alpha_t[idx], alpha_prev[idx],
                                  torch.tensor([ROWS[r][2] for r in rows]), noise)
            else:
                last = torch.tensor([done[r] == ROWS[r][1] - 1 for r in rows])
                x_new, state = dpm_solver_pp_2m_step(xb[idx], eps[idx], alpha_t[idx], alpha_prev[idx],
                                                     DPMSolverState.cat([states[r] for r in rows]), last)
                for j, r in enumerate(rows):
                    states[r] = state[j:j + 1]
            for j, r in enumerate(rows):
                x[r] = x_new[j:j + 1]
        for r in active:
            done[r] += 1

    for r, (sampler, steps, eta, guidance, _) in enumerate(ROWS):
        alone = sample(toy_denoiser, x_T(100 + r, one), y[r], sampler=sampler, steps=steps, guidance_scale=guidance,
                       null_class=NULL, eta=eta, generator=torch.Generator().manual_seed(200 + r))
        assert (x[r] - alone).abs().max() < 1e-6, f"row {r}"


def test_dpm_solver_state_index_and_cat_round_trip():
    x = x_T(0, (3, *SHAPE[1:]))
    _, state = dpm_solver_pp_2m_step(x, toy_denoiser(x, per_row(999, 3), per_row(0, 3)), per_row(0.01, 3),
                                     per_row(0.02, 3), DPMSolverState.initial(x))
    again = DPMSolverState.cat([state[2:], state[:2]])[torch.tensor([1, 2, 0])]
    for field in ("x0_prev", "lambda_prev", "has_history"):
        assert torch.equal(getattr(again, field), getattr(state, field))


# --- validation and purity ---------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(sampler="euler"), r"^sampler must be one of \('ddim', 'dpmpp_2m'\), got 'euler'$"),
    (dict(steps=0), r"^num_steps must be an integer in \[1, 1000\], got 0$"),
    (dict(eta=1.5), r"^eta must be in \[0, 1\], got 1.5$"),
    (dict(sampler="dpmpp_2m", eta=0.5), r"^eta applies only to the 'ddim' sampler, got eta=0.5 with 'dpmpp_2m'$"),
    (dict(guidance_scale=-1.0), r"^guidance_scale must be >= 0, got -1.0$"),
    (dict(x_T=torch.zeros(2, 4, 4)), r"^x_T must be \[B, C, H, W\], got shape \(2, 4, 4\)$"),
    (dict(class_ids=torch.tensor([1, 2, 3])), r"^class_ids must be \[B\] with B = 2, got shape \(3,\)$"),
])
def test_sample_validates_arguments(kwargs, message):
    args = dict(x_T=x_T(0), class_ids=torch.tensor([1, 2]), sampler="ddim", steps=2, guidance_scale=1.0,
                null_class=NULL) | kwargs
    with pytest.raises(ValueError, match=message):
        sample(toy_denoiser, args.pop("x_T"), args.pop("class_ids"), **args)


def test_ddim_step_requires_noise_when_eta_positive():
    x = x_T(0)
    with pytest.raises(ValueError, match=r"^noise is required when any eta > 0$"):
        ddim_step(x, x, per_row(0.1), per_row(0.2), torch.tensor([0.0, 0.5]), None)


ROOT = Path(__file__).parents[1]
# core/ is what every layer may import; it may import none of them (nor may the samplers, through it)
FORBIDDEN = ("serving", "model_store", "exporters", "families", "genserve", "loadtests", "benchmarks")


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def test_samplers_import_only_torch_the_stdlib_and_core():
    """Pure step maths: no numpy, no runtime, no Ray, nothing of serving; read from the source, so an import
    inside a function counts too."""
    paths = sorted((ROOT / "core" / "samplers").glob("*.py"))
    assert {"ddim.py", "dpm_solver.py", "schedule.py"} <= {p.name for p in paths}  # the test reads the samplers
    allowed = set(sys.stdlib_module_names) | {"torch", "core"}
    for path in paths:
        names = _top_level_imports(path)
        assert {n.split(".")[0] for n in names} <= allowed, f"{path.name} imports {sorted(names)}"
        assert not {n for n in names if n.startswith("core.runtime")}, f"{path.name} imports the runtime"


def _imported_packages(modules: list[str]) -> list[str]:
    """The FORBIDDEN packages in sys.modules after a fresh interpreter imports `modules`."""
    script = ("import importlib, sys\n"
              f"for m in {modules!r}:\n    importlib.import_module(m)\n"
              f"print(sorted({{n.split('.')[0] for n in sys.modules}} & set({FORBIDDEN!r})))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])


def test_core_and_the_samplers_import_nothing_above_them():
    """Importing core.samplers and every module of core pulls in no serving, model_store, exporters, families,
    genserve, loadtests or benchmarks module, however indirectly (checked in a fresh interpreter)."""
    import core
    modules = ["core.samplers"] + [m.name for m in pkgutil.walk_packages(core.__path__, "core.")]
    assert {"core.samplers.ddim", "core.contracts", "core.settings"} <= set(modules)
    assert _imported_packages(modules) == []
    assert _imported_packages(["serving.api.classes"]) == ["serving"]  # the check sees what it looks for
