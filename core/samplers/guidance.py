"""Classifier-free guidance: Ho & Salimans 2022, "Classifier-Free Diffusion Guidance" (arXiv:2207.12598)."""

from collections.abc import Callable

import torch

from core.samplers.schedule import per_sample

# denoise(x [N, C, H, W] float32, t [N] int64, y [N] int64) -> eps [N, C, H, W]
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def classifier_free_guidance(eps_cond: torch.Tensor, eps_uncond: torch.Tensor,
                             scale: float | torch.Tensor) -> torch.Tensor:
    """ε̃ = ε_u + s (ε_c - ε_u): eq. 6 with w = s - 1.

    eps_*: [B, C, H, W]; scale: a float or a per-sample [B] tensor. s = 1 is plain conditional.
    """
    if isinstance(scale, torch.Tensor):
        scale = per_sample(scale, eps_cond)
    return eps_uncond + scale * (eps_cond - eps_uncond)


def guided_eps(denoise: Denoiser, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
               guidance_scale: float, null_class: int) -> torch.Tensor:
    """ε for x [B, C, H, W] at t [B] and class y [B], guided: ONE forward over 2B rows, cond then uncond."""
    if guidance_scale == 1.0:
        return denoise(x, t, y)
    eps = denoise(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))  # [2B, ...]
    eps_cond, eps_uncond = eps.chunk(2)
    return classifier_free_guidance(eps_cond, eps_uncond, guidance_scale)
