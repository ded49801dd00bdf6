"""The PixelCNN family around the forward pass: one row per image, each request at its own pixel
position (steps_done in raster order), all in ONE forward of the full 28x28 logits graph; then each
image's next pixel is sampled with its request's temperature and generator and written into its x."""

from __future__ import annotations

import torch

from serving.engine.request import PixelCNNState
from serving.engine.runner import LogitsRunner
from serving.engine.scheduler import StepPlan
from core.samplers.autoregressive import IMAGE_SIZE, draw_uniforms, logits_at, sample_pixels


class PixelCNNStepper:
    def __init__(self, runner: LogitsRunner):
        self.runner = runner

    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Runs once per step, off the event loop: ONE forward -> logits [R, 256, 28, 28].
        The graph sees whole images; masking makes pixel p's logits depend on pixels < p only, so the
        not-yet-sampled zeros after each row's position do not matter."""
        x = torch.cat([s.x for s in plan.requests])  # [R, 1, 28, 28]
        y = torch.cat([torch.full((s.request.n,), s.request.class_id, dtype=torch.int64) for s in plan.requests])
        return self.runner.execute(x, y)

    def update(self, plan: StepPlan, logits: torch.Tensor) -> None:
        """Runs after the forward: sample every image's pixel at its request's position and write it."""
        states: list[PixelCNNState] = plan.requests
        counts = [s.request.n for s in states]
        step = torch.cat([torch.full((n,), s.steps_done) for s, n in zip(states, counts)])  # [R]
        temperature = torch.cat([torch.full((n,), float(s.request.temperature)) for s, n in zip(states, counts)])
        levels = sample_pixels(logits_at(logits, step), temperature,
                               draw_uniforms([s.generator for s in states], counts))  # [R]
        start = 0
        for s, n in zip(states, counts):
            row, col = divmod(s.steps_done, IMAGE_SIZE)  # raster order
            s.x[:, 0, row, col] = levels[start:start + n].float()
            start += n

    def images(self, state: PixelCNNState) -> torch.Tensor:
        """Runs when a request finishes: its pixels as uint8 [n, 1, 28, 28]."""
        return state.x.to(torch.uint8)
