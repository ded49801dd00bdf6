"""A whole sampling run for one batch at one setting: for offline evaluation (families.diffusion.sample)
and tests. The serving engine advances each request one step at a time through the same registry
(core.samplers.registry); this loop is the reference its results must match.
"""

import torch

from core.samplers.guidance import Denoiser, guided_eps
from core.samplers.registry import StepRows, sampler as sampler_named
from core.samplers.schedule import FINAL_TIMESTEP, alphas_at, inference_timesteps, linear_alphas_cumprod


@torch.no_grad()
def sample(denoise: Denoiser, x_T: torch.Tensor, class_ids: torch.Tensor, *, sampler: str, steps: int,
           guidance_scale: float, null_class: int, eta: float = 0.0,
           generator: torch.Generator | None = None, clip_x0: bool = False) -> torch.Tensor:
    """Run `steps` steps of `sampler` from x_T [B, C, H, W] for class_ids [B]; returns x_0 [B, C, H, W].

    eta (stochastic samplers only) > 0 draws the step noise from generator, on x_T's device. clip_x0
    clamps every step's x_0 prediction to [-1, 1] (the final x_0 then lies in it too).
    """
    spec = sampler_named(sampler)
    timesteps = inference_timesteps(steps)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if eta != 0.0 and not spec.stochastic:
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
    state = spec.state.initial(x)
    for i, t in enumerate(timesteps):
        # stepping to the next listed timestep; diffusers' DDIM uses t - T // n instead, the same when n divides T
        is_last = i == len(timesteps) - 1
        t_b = torch.full((b,), t, dtype=torch.int64, device=device)
        t_prev = torch.full((b,), FINAL_TIMESTEP if is_last else timesteps[i + 1], dtype=torch.int64, device=device)
        eps = guided_eps(denoise, x, t_b, y, guidance_scale, null_class)
        noise = torch.randn(x.shape, generator=generator, device=device) if eta > 0 else None
        rows = StepRows(alphas_at(alphas_cumprod, t_b), alphas_at(alphas_cumprod, t_prev),
                        torch.full((b,), is_last, device=device), eta_b, noise)
        x, state = spec.step(x, eps, rows, state, clip_x0)
    return x
