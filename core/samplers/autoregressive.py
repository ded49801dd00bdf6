"""Autoregressive (PixelCNN) step maths: one pixel per forward pass, in raster order, for a batch whose
rows sit at different pixel positions and sample at different temperatures and guidance scales.

The network outputs each pixel's distribution as the parameters of a mixture of K discretized logistics
(PixelCNN++, Salimans et al. 2017); mixture_log_probs turns them into log-probabilities of the 256 levels
in float64, outside the exported graphs: the graphs then carry only well-conditioned numbers (logits,
means, log-scales), and training, sampling and the served likelihood all use this one function.

Sampling is by inverse CDF from one uniform per row, which each request draws from its own generator:
the sampling itself is then one batched op, and a request consumes the same random numbers whatever
it is batched with. families.pixelcnn.sample and the engine's PixelCNNStepper both sample through
guided_levels, so a (seed, class, settings) gives the same image offline and served.
"""

import math

import torch
import torch.nn.functional as F

from core.contracts import IMAGE_SIZE, LEVELS, NUM_PIXELS  # noqa: F401 (IMAGE_SIZE: the stepper's raster order)
from core.samplers.guidance import classifier_free_guidance

MIN_LOG_SCALE = -7.0  # PixelCNN++'s floor: a logistic no narrower than 1/1100 of the [-1, 1] range


def mixture_log_probs(params: torch.Tensor, levels: torch.Tensor | None = None) -> torch.Tensor:
    """log P(level) under each pixel's mixture of K discretized logistics, in float64.

    params [B, 3K, ...]: K mixture logits, K means (of the level scaled to [-1, 1]: v / 127.5 - 1), K
    log-scales. levels [B, ...] integer-valued (the true levels: likelihood and training loss) gives
    [B, ...]; None gives every level, [B, 256, ...] (sampling). Level v is the bin v / 127.5 - 1 +- 1/255.
    """
    p = params.double()
    logit, mean, log_scale = p.chunk(3, dim=1)                                     # [B, K, ...] each
    if levels is None:  # a levels axis after the components: [B, K, 256, ...]
        shape = (1, 1, LEVELS) + (1,) * (p.dim() - 2)
        logit, mean, log_scale = logit.unsqueeze(2), mean.unsqueeze(2), log_scale.unsqueeze(2)
        v = torch.arange(LEVELS, dtype=torch.float64, device=p.device).view(shape)
    else:
        v = levels.double().unsqueeze(1)                                           # [B, 1, ...]
    centered, inv_s = v / 127.5 - 1.0 - mean, torch.exp(-log_scale.clamp(min=MIN_LOG_SCALE))
    a, b = inv_s * (centered + 1 / 255), inv_s * (centered - 1 / 255)             # the bin's edges, a > b
    # log(sigmoid(a) - sigmoid(b)) = log sigmoid(a) + log sigmoid(-b) + log(1 - e^(b - a)): no difference
    # of two nearly equal numbers in any regime (far in a tail, or a bin narrow against the scale). The
    # last term, b - a = -2 inv_s / 255, is the same at every level: once per component. Level 0 takes the
    # left tail (b = -inf: the last two terms vanish), 255 the right (a = +inf: all but the second);
    # masked rather than fed infinities, which would put NaN in the gradients
    first, last = v < 0.5, v > LEVELS - 1.5
    log_bin = (torch.where(last, 0.0, -F.softplus(-a)) + torch.where(first, 0.0, -F.softplus(b))
               + torch.where(first | last, 0.0, torch.log(-torch.expm1(-2 / 255 * inv_s))))
    return torch.logsumexp(log_bin + torch.log_softmax(logit, dim=1), dim=1)


def bits_per_dim(params: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Exact -log2 p(x) / 784 [B] float64 of images [B, 28, 28] (levels 0..255) from the mixture parameters
    [B, 3K, 28, 28] of ONE teacher-forced forward (masking makes pixel p's parameters see pixels < p only)."""
    nats = -mixture_log_probs(params, images)                                      # [B, 28, 28]
    return nats.flatten(1).sum(1) / (NUM_PIXELS * math.log(2))


def draw_uniforms(generators: list[torch.Generator], counts: list[int]) -> torch.Tensor:
    """counts[i] uniforms in [0, 1) from generators[i], concatenated: [sum(counts)] float64.

    One draw per request (all its images at once), so its stream never depends on batch-mates.
    """
    return torch.cat([torch.rand(n, generator=g, dtype=torch.float64) for g, n in zip(generators, counts)])


def sample_pixels(logits: torch.Tensor, temperature: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Levels drawn from softmax(logits / temperature), one per row: logits [B, 256] (log-probabilities, or
    any per-row shift of them), temperature [B] > 0,
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
