"""The training noise schedule and the inference timesteps, shared by every sampler.

Notation follows DDPM (Ho et al. 2020): alpha_cumprod is ᾱ_t = ∏_{s<=t} (1 - β_s), so
x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε.
"""

import torch

from core.contracts import NUM_TRAIN_TIMESTEPS

# Stands for "after the last step": clean data, ᾱ = 1 (diffusers' set_alpha_to_one=True).
FINAL_TIMESTEP = -1


def linear_alphas_cumprod(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = 1e-4,
                          beta_end: float = 0.02) -> torch.Tensor:
    """ᾱ_t for DDPM's linear β schedule (Ho et al. 2020, §4): [T] float32, bit for bit as diffusers."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


def inference_timesteps(num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """Descending training timesteps visited at inference, "trailing" spacing (Lin et al. 2023, Table 2).

    t_i = round(T (n - i) / n) - 1 for i = 0..n-1, so the first step is always t = T - 1: starting
    below it leaves signal the model never learned to remove, which shows most with few steps.
    Same as diffusers' timestep_spacing="trailing", except that we use exact arithmetic where its
    float np.arange rounds an exact .5 down or yields n + 1 steps (e.g. n = 48, 61).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be an integer in [1, {num_train_timesteps}], got {num_steps!r}")
    return [round(num_train_timesteps * (num_steps - i) / num_steps) - 1 for i in range(num_steps)]


def alphas_at(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-sample ᾱ_t: [T] float32, t [B] int64 (FINAL_TIMESTEP allowed) -> [B] float64.

    Float64 because the sampler coefficients divide by sqrt(ᾱ_t) ~ 6e-3 at t = 999.
    """
    alphas_cumprod = alphas_cumprod.to(device=t.device, dtype=torch.float64)
    return torch.where(t >= 0, alphas_cumprod[t.clamp(min=0)], 1.0)


def per_sample(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A [B] coefficient as [B, 1, ..., 1] float32, to broadcast against x [B, ...]."""
    return coef.to(torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
