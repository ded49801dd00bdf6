"""The diffusion family around the forward pass: lay the planned requests out as denoiser rows, and
apply each request's own sampler step (DDIM or DPM-Solver++(2M)) to what the forward returned.

Row layout: requests in plan order, each taking a contiguous block: its n conditional rows, then an
unconditional row (class NULL_CLASS) at the same x_t and t for each of its guided images, in order. So
classifier-free guidance costs rows in the SAME forward, never a second one.
"""

from __future__ import annotations

import torch

from core.samplers import (FINAL_TIMESTEP, SAMPLERS, StepRows, alphas_at, classifier_free_guidance,
                           linear_alphas_cumprod)
from serving.engine.request import DiffusionState, randn_rows
from serving.engine.runner import DenoiseRunner
from serving.engine.scheduler import StepPlan


def to_uint8(x0: torch.Tensor) -> torch.Tensor:
    """x_0 in [-1, 1] (clamped) -> uint8 images, as families.common.from_signed."""
    return ((x0.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class DiffusionStepper:
    def __init__(self, runner: DenoiseRunner, clip_x0: bool = True):
        self.runner = runner
        self.clip_x0 = clip_x0  # clamp each step's x_0 prediction to the data range, as the families' sampler does
        self.alphas_cumprod = linear_alphas_cumprod()  # [1000] float32, the training schedule

    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Runs once per step, off the event loop: ONE forward over plan.num_rows rows -> eps [R, 1, 28, 28]."""
        xs, ts, ys = [], [], []
        for s in plan.requests:
            n = s.request.n
            xs.append(s.x)
            if s.rows > n:  # the guided images' x again, for their unconditional rows
                xs.append(s.x if s.rows == 2 * n else s.x[s.guided])
            ts.append(torch.full((s.rows,), s.timesteps[s.steps_done], dtype=torch.int64))
            ys.append(s.y)
        return self.runner.execute(torch.cat(xs), torch.cat(ts), torch.cat(ys))

    def update(self, plan: StepPlan, eps_rows: torch.Tensor) -> None:
        """Runs after the forward: each request's sampler step on its images, batched per sampler with
        per-image coefficients; writes each state's new x (and DPM-Solver++ history). Images are the
        unit from here on: N = sum of n over the plan."""
        states: list[DiffusionState] = plan.requests
        cond, uncond, scale = [], [], []  # per image: its rows in eps_rows, and its guidance scale
        row = 0
        for s in states:
            n = s.request.n
            cond.append(torch.arange(row, row + n))
            # unguided: the conditional row doubles as the unconditional one, and ε_c + 1·0 = ε_c exactly
            uncond.append(cond[-1].clone())
            uncond[-1][s.guided] = torch.arange(row + n, row + s.rows)
            scale.append(torch.where(s.guided, float(s.request.guidance_scale), 1.0))
            row += s.rows
        eps = classifier_free_guidance(eps_rows[torch.cat(cond)], eps_rows[torch.cat(uncond)], torch.cat(scale))

        x = torch.cat([s.x for s in states])  # [N, 1, 28, 28]
        t = torch.cat([torch.full((s.request.n,), s.timesteps[s.steps_done]) for s in states])  # [N]
        t_prev = torch.cat([torch.full((s.request.n,), _next_timestep(s)) for s in states])  # [N]
        alpha_t, alpha_prev = alphas_at(self.alphas_cumprod, t), alphas_at(self.alphas_cumprod, t_prev)
        offsets = torch.tensor([0] + [s.request.n for s in states]).cumsum(0).tolist()  # request i: images [o_i, o_i+1)

        for i, s in enumerate(states):
            if s.preview_due:  # x̂₀ = (x_t - √(1-ᾱ_t) ε) / √ᾱ_t, the clean images this step predicts: a preview
                a = alpha_t[offsets[i]:offsets[i + 1]].double().view(-1, 1, 1, 1)
                s.x0_pred = ((x[offsets[i]:offsets[i + 1]] - (1 - a).sqrt() * eps[offsets[i]:offsets[i + 1]])
                             / a.sqrt()).float()
        last = torch.cat([torch.full((s.request.n,), s.steps_done == s.steps_total - 1) for s in states])  # [N]
        eta = torch.cat([torch.full((s.request.n,), float(s.request.eta), dtype=torch.float64) for s in states])
        for name, sampler in SAMPLERS.items():
            members = [i for i, s in enumerate(states) if s.request.sampler == name]
            if not members:
                continue
            group = [states[i] for i in members]
            idx = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in members])
            rows = StepRows(alpha_t[idx], alpha_prev[idx], last[idx], eta[idx], _step_noise(group))
            x_new, history = sampler.step(x[idx], eps[idx], rows, sampler.state.cat([s.solver for s in group]),
                                          self.clip_x0)
            start = 0
            for s in group:  # each request's images and sampler history, split back out
                s.x, s.solver = x_new[start:start + s.request.n], history[start:start + s.request.n]
                start += s.request.n

    def images(self, state: DiffusionState) -> torch.Tensor:
        """Runs when a request finishes: its x_0 as uint8 [n, 1, 28, 28]."""
        return to_uint8(state.x)

    def preview(self, state: DiffusionState) -> torch.Tensor:
        """Runs after a step at one of the request's preview points: that step's x̂₀ as uint8 [n, 1, 28, 28]."""
        return to_uint8(state.x0_pred)


def _step_noise(states: list[DiffusionState]) -> torch.Tensor | None:
    """Step noise for stochastic (eta > 0) requests, from each one's own generator(s): one randn([n, 1, 28, 28])
    per step, as loop.sample draws it (a row from each image's own, with per-image seeds); rows with eta = 0
    get zeros (σ = 0 adds exactly 0). None when no request needs any."""
    if not any(s.request.eta > 0 for s in states):
        return None
    return torch.cat([randn_rows(s.generators, s.x.shape) if s.request.eta > 0 else torch.zeros_like(s.x)
                      for s in states])


def _next_timestep(s: DiffusionState) -> int:
    """The timestep this step lands on: the next listed one, or 'clean data' after the last."""
    return s.timesteps[s.steps_done + 1] if s.steps_done + 1 < s.steps_total else FINAL_TIMESTEP
