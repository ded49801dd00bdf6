"""A whole sampling run for one batch at one setting: for offline evaluation and tests.

The serving engine does not use this loop: it advances each request one step at a time with the
step functions. This is the reference its results must match.
"""

from collections.abc import Callable

import torch

from core.samplers.ddim import ddim_step
from core.samplers.dpm_solver import DPMSolverState, dpm_solver_pp_2m_step
from core.samplers.schedule import FINAL_TIMESTEP, alphas_at, inference_timesteps, linear_alphas_cumprod, per_sample

SAMPLERS = ("ddim", "dpmpp_2m")

# denoise(x [N, C, H, W] float32, t [N] int64, y [N] int64) -> eps [N, C, H, W]
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def classifier_free_guidance(eps_cond: torch.Tensor, eps_uncond: torch.Tensor,
                             scale: float | torch.Tensor) -> torch.Tensor:
    """ε̃ = ε_u + s (ε_c - ε_u): Ho & Salimans 2022 (arXiv:2207.12598) eq. 6 with w = s - 1.

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


@torch.no_grad()
def sample(denoise: Denoiser, x_T: torch.Tensor, class_ids: torch.Tensor, *, sampler: str, steps: int,
           guidance_scale: float, null_class: int, eta: float = 0.0,
           generator: torch.Generator | None = None, clip_x0: bool = False) -> torch.Tensor:
    """Run `steps` steps of `sampler` from x_T [B, C, H, W] for class_ids [B]; returns x_0 [B, C, H, W].

    eta (DDIM only) > 0 draws the step noise from generator, on x_T's device. clip_x0 clamps every
    step's x_0 prediction to [-1, 1] (the final x_0 then lies in it too).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    timesteps = inference_timesteps(steps)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if eta != 0.0 and sampler != "ddim":
        raise ValueError(f"eta applies only to the 'ddim' sampler, got eta={eta} with {sampler!r}")
    if not guidance_scale >= 0.0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
    if x_T.ndim != 4:
        raise ValueError(f"x_T must be [B, C, H, W], got shape {tuple(x_T.shape)}")
    if class_ids.shape != x_T.shape[:1]:
        raise ValueError(f"class_ids must be [B] with B = {x_T.shape[0]}, got shape {tuple(class_ids.shape)}")

    b, device = x_T.shape[0], x_T.device
    alphas_cumprod = linear_alphas_cumprod().to(device)
    x = x_T.float()
    y = class_ids.to(device=device, dtype=torch.int64)
    eta_b = torch.full((b,), eta, dtype=torch.float64, device=device)
    state = DPMSolverState.initial(x)
    for i, t in enumerate(timesteps):
        # stepping to the next listed timestep; diffusers' DDIM uses t - T // n instead, the same when n divides T
        is_last = i == len(timesteps) - 1
        t_b = torch.full((b,), t, dtype=torch.int64, device=device)
        t_prev = torch.full((b,), FINAL_TIMESTEP if is_last else timesteps[i + 1], dtype=torch.int64, device=device)
        eps = guided_eps(denoise, x, t_b, y, guidance_scale, null_class)
        alpha_t, alpha_prev = alphas_at(alphas_cumprod, t_b), alphas_at(alphas_cumprod, t_prev)
        if sampler == "ddim":
            noise = torch.randn(x.shape, generator=generator, device=device) if eta > 0 else None
            x = ddim_step(x, eps, alpha_t, alpha_prev, eta_b, noise, clip_x0=clip_x0)
        else:
            # the last step is first order, as diffusers' (lower_order_final, final sigma 0) default
            x, state = dpm_solver_pp_2m_step(x, eps, alpha_t, alpha_prev, state,
                                             lower_order=torch.full((b,), is_last, device=device),
                                             clip_x0=clip_x0)
    return x
