"""The PixelCNN family around the forward pass: one row per image (two when guided), each request at its
own pixel position (steps_done in raster order), all in ONE forward of the step graph, which returns only
the distribution of each row's own pixel (a logistic mixture's parameters); then its 256 log-probabilities
are computed in float64 and each image's pixel is sampled with its request's temperature, guidance scale and
generator and written into its x.

Row layout, as diffusion's: requests in plan order, each taking a contiguous block: its n conditional
rows, then an unconditional row (class NULL_CLASS) for each guided image, at that image's x and position.
Each image draws its uniforms from its own generator when the request has per-image seeds."""

from __future__ import annotations

import torch

from core.samplers.autoregressive import IMAGE_SIZE, draw_uniforms, guided_levels, mixture_log_probs
from serving.engine.request import PixelCNNState
from serving.engine.runner import StepRunner
from serving.engine.scheduler import StepPlan


class PixelCNNStepper:
    def __init__(self, runner: StepRunner):
        self.runner = runner

    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Runs once per step, off the event loop: ONE forward -> mixture parameters [R, 3K], row i's at its
        own pixel. The graph sees whole images; masking makes pixel p's distribution depend on pixels < p
        only, so the not-yet-sampled zeros after each row's position do not matter."""
        xs, ys, ps = [], [], []
        for s in plan.requests:
            xs += [s.x, s.x[s.guided]]
            ys.append(s.y)
            ps.append(torch.full((s.rows,), s.steps_done, dtype=torch.int64))
        return self.runner.execute(torch.cat(xs), torch.cat(ys), torch.cat(ps))

    def update(self, plan: StepPlan, mixture: torch.Tensor) -> None:
        """Runs after the forward: sample every image's pixel at its request's position and write it."""
        log_p = mixture_log_probs(mixture)  # [R, 256] float64
        states: list[PixelCNNState] = plan.requests
        cond, uncond, scale, temperature = [], [], [], []  # per image
        generators, counts = [], []
        row = 0
        for s in states:
            n = s.request.n
            cond.append(torch.arange(row, row + n))
            own = cond[-1].clone()  # an unguided image's "unconditional" row is its own: guidance 1 leaves it
            own[s.guided] = torch.arange(row + n, row + s.rows)
            uncond.append(own)
            scale.append(torch.where(s.guided, float(s.request.guidance_scale), 1.0))
            temperature.append(torch.full((n,), float(s.request.temperature)))
            generators += s.generators
            counts += [n] if len(s.generators) == 1 else [1] * n  # all its images at once, or one each
            row += s.rows
        levels = guided_levels(log_p[torch.cat(cond)], log_p[torch.cat(uncond)], torch.cat(scale),
                               torch.cat(temperature), draw_uniforms(generators, counts))
        start = 0
        for s in states:
            row, col = divmod(s.steps_done, IMAGE_SIZE)  # raster order
            s.x[:, 0, row, col] = levels[start:start + s.request.n].float()
            start += s.request.n

    def images(self, state: PixelCNNState) -> torch.Tensor:
        """Runs when a request finishes: its pixels as uint8 [n, 1, 28, 28]."""
        return state.x.to(torch.uint8)

    def preview(self, state: PixelCNNState) -> torch.Tensor:
        """Runs after a step at one of the request's preview points: the pixels sampled so far (the rest 0)."""
        return state.x.to(torch.uint8)
