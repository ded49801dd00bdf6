"""Autoregressive (PixelCNN) step maths: one pixel per forward pass, in raster order, for a batch whose
rows sit at different pixel positions and sample at different temperatures and guidance scales.

Sampling is by inverse CDF from one uniform per row, which each request draws from its own generator:
the sampling itself is then one batched op, and a request consumes the same random numbers whatever
it is batched with. families.pixelcnn.sample and the engine's PixelCNNStepper both sample through
guided_levels, so a (seed, class, settings) gives the same image offline and served.
"""

import torch

from core.contracts import IMAGE_SIZE, LEVELS  # noqa: F401 (IMAGE_SIZE: the stepper's raster order)
from core.samplers.guidance import classifier_free_guidance


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


def guided_levels(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor, temperature: torch.Tensor,
                  u: torch.Tensor) -> torch.Tensor:
    """Levels [B] from classifier-free guided logits l_u + s (l_c - l_u) (Ho & Salimans 2022, on the
    logits as on diffusion's ε): cond and uncond [B, 256]; scale, temperature, u [B]. Where a row is
    unguided, pass its cond logits as uncond too: l_c + s * 0 = l_c exactly."""
    return sample_pixels(classifier_free_guidance(cond, uncond, scale), temperature, u)
