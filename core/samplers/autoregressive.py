"""Autoregressive (PixelCNN) step maths: one pixel per forward pass, in raster order, for a batch whose
rows sit at different pixel positions and sample at different temperatures.

Sampling is by inverse CDF from one uniform per row, which each request draws from its own generator:
the sampling itself is then one batched op, and a request consumes the same random numbers whatever
it is batched with.
"""

import torch

from core.contracts import IMAGE_SIZE, LEVELS, NUM_PIXELS  # one step per pixel, raster order


def raster_position(step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel sampled at step s (0..783) of raster order: row s // 28, column s % 28. step: [B] int64."""
    return torch.div(step, IMAGE_SIZE, rounding_mode="floor"), step % IMAGE_SIZE


def logits_at(logits: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Each row's logits at its own position: logits [B, 256, 28, 28], step [B] int64 -> [B, 256]."""
    row, col = raster_position(step)
    return logits[torch.arange(logits.shape[0]), :, row, col]


def draw_uniforms(generators: list[torch.Generator], counts: list[int]) -> torch.Tensor:
    """counts[i] uniforms in [0, 1) from generators[i], concatenated: [sum(counts)] float64.

    One draw per request (all its images at once), so its stream never depends on batch-mates.
    """
    return torch.cat([torch.rand(n, generator=g, dtype=torch.float64) for g, n in zip(generators, counts)])


def sample_pixels(logits: torch.Tensor, temperature: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Levels drawn from softmax(logits / temperature), one per row: logits [B, 256], temperature [B] > 0,
    u [B] uniforms in [0, 1) -> [B] int64 in 0..255.

    Inverse CDF: the first level whose cumulative probability exceeds u. Float64 so the CDF of 256
    levels sums cleanly; levels of probability 0 have a flat CDF and are never picked.
    """
    probs = torch.softmax(logits.double() / temperature.double()[:, None], dim=-1)  # [B, 256]
    cdf = probs.cumsum(-1)  # [B, 256]
    # scale u by the total rather than trusting it to be exactly 1 after rounding
    level = torch.searchsorted(cdf, (u.double() * cdf[:, -1])[:, None], right=True)[:, 0]  # [B]
    return level.clamp(max=LEVELS - 1)
