"""DDIM: Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models" (arXiv:2010.02502)."""

import torch

from core.samplers.schedule import per_sample


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor, alpha_prev: torch.Tensor,
              eta: torch.Tensor, noise: torch.Tensor | None, *, clip_x0: bool = False) -> torch.Tensor:
    """One DDIM step x_t -> x_prev (eq. 12), with σ_t(η) of eq. 16; every coefficient per sample.

    x_t, eps, noise: [B, C, H, W]; alpha_t, alpha_prev, eta: [B], ᾱ at the current and the next
    timestep (1.0 after the last step). eta = 0 is deterministic DDIM, eta = 1 is DDPM-like.
    noise ~ N(0, I) may be None only when every eta is 0. clip_x0 clamps the predicted x_0 to the data
    range [-1, 1] (diffusers' clip_sample with use_clipped_model_output), which removes the speckle that a
    few-step, guided sampler leaves on a small pixel-space model.
    """
    if noise is None and bool((eta > 0).any()):
        raise ValueError("noise is required when any eta > 0")
    # Coefficients in float64: ᾱ_t is ~4e-5 at t = 999 and 1 - ᾱ_t/ᾱ_prev loses digits in float32.
    a_t, a_prev = alpha_t.double(), alpha_prev.double()  # [B]
    sigma = eta.double() * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()  # σ_t(η), eq. 16
    # clamp: rounding could make 1 - ᾱ_prev - σ² a hair negative at eta = 1.
    dir_coef = (1 - a_prev - sigma**2).clamp(min=0).sqrt()

    x, eps = x_t.float(), eps.float()
    x0 = (x - per_sample((1 - a_t).sqrt(), x) * eps) / per_sample(a_t.sqrt(), x)  # "predicted x_0"
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
        # and re-derive ε from the clipped x_0 (GLIDE; diffusers' use_clipped_model_output): else the step
        # mixes a clipped x_0 with the raw ε that contradicts it, which at t near T (x_0 off by ~1/√ᾱ_t)
        # wrecks the sample: FD 558 vs 80 at 25 guided steps, 200 samples. With it, DDIM(η=0) is DPM-Solver++(1).
        eps = (x - per_sample(a_t.sqrt(), x) * x0) / per_sample((1 - a_t).sqrt(), x)
    x_prev = per_sample(a_prev.sqrt(), x) * x0 + per_sample(dir_coef, x) * eps  # + "direction pointing to x_t"
    if noise is not None:
        x_prev = x_prev + per_sample(sigma, x) * noise.float()  # + random noise
    return x_prev.to(x_t.dtype)
