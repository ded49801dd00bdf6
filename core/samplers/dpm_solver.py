"""DPM-Solver++(2M): Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models" (arXiv:2211.01095), Algorithm 2, in diffusers' "midpoint" form.

Notation of the paper: α_t = sqrt(ᾱ_t), σ_t = sqrt(1 - ᾱ_t), λ_t = log(α_t / σ_t) (half log-SNR);
the solver integrates the data prediction x_θ = (x_t - σ_t ε_θ) / α_t over λ.
"""

from dataclasses import dataclass

import torch

from core.samplers.schedule import per_sample


@dataclass
class DPMSolverState:
    """Per-request multistep history, batched on dim 0 so the engine can cat / index requests' states."""

    x0_prev: torch.Tensor  # [B, C, H, W] float32, x_θ at the previous step (zeros before the first step)
    lambda_prev: torch.Tensor  # [B] float64, λ at the previous step's timestep
    has_history: torch.Tensor  # [B] bool, False until the first step has run: that step is first order

    @classmethod
    def initial(cls, x_T: torch.Tensor) -> "DPMSolverState":
        """The state of requests that have not taken a step yet; x_T [B, C, H, W] gives shape and device."""
        b = x_T.shape[0]
        return cls(x0_prev=torch.zeros_like(x_T, dtype=torch.float32),
                   lambda_prev=torch.zeros(b, dtype=torch.float64, device=x_T.device),
                   has_history=torch.zeros(b, dtype=torch.bool, device=x_T.device))

    def __getitem__(self, index) -> "DPMSolverState":
        """The states of the rows selected by index (int slice, index tensor or bool mask)."""
        return DPMSolverState(self.x0_prev[index], self.lambda_prev[index], self.has_history[index])

    @staticmethod
    def cat(states: list["DPMSolverState"]) -> "DPMSolverState":
        """Stack several requests' states into one batch, in order."""
        return DPMSolverState(torch.cat([s.x0_prev for s in states]),
                              torch.cat([s.lambda_prev for s in states]),
                              torch.cat([s.has_history for s in states]))


def alpha_sigma_lambda(alpha_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ᾱ [B] -> α, σ, λ [B] float64; ᾱ = 1 (clean data) gives σ = 0, λ = +inf."""
    alpha_cumprod = alpha_cumprod.double()
    alpha, sigma = alpha_cumprod.sqrt(), (1 - alpha_cumprod).sqrt()
    return alpha, sigma, alpha.log() - sigma.log()


def dpm_solver_pp_2m_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor, alpha_prev: torch.Tensor,
                          state: DPMSolverState, lower_order: torch.Tensor | None = None, *,
                          clip_x0: bool = False) -> tuple[torch.Tensor, DPMSolverState]:
    """One DPM-Solver++(2M) step x_t -> x_prev (Algorithm 2); every coefficient per sample.

    x_t, eps: [B, C, H, W]; alpha_t, alpha_prev: [B], ᾱ at the current and the next timestep (1.0
    after the last step). lower_order [B] bool forces the first-order update (= DDIM, eta 0) for
    those rows, as diffusers' lower_order_final does on the last of < 15 steps. Rows without history
    and rows stepping to ᾱ = 1 are first order anyway: h = ∞ there and the correction diverges.
    clip_x0 clamps the data prediction to [-1, 1] (diffusers' thresholding with sample_max_value 1).
    Returns x_prev and the state for the row's next step.
    """
    a_s, s_s, lam_s = alpha_sigma_lambda(alpha_t)  # [B], "s" = current time, as in the paper
    a_t, s_t, lam_t = alpha_sigma_lambda(alpha_prev)  # [B], "t" = the time stepped to
    h = lam_t - lam_s  # [B]
    phi = torch.expm1(-h)  # e^{-h} - 1

    second_order = state.has_history & torch.isfinite(h)
    if lower_order is not None:
        second_order &= ~lower_order
    # midpoint form: D1 = (x_θ(s) - x_θ(s_prev)) / r with r = h_prev / h; torch.where discards
    # the inf/nan of rows that take the first-order update.
    r = (lam_s - state.lambda_prev) / h
    d1_coef = torch.where(second_order, -0.5 * a_t * phi / r, 0.0)

    x, eps = x_t.float(), eps.float()
    x0 = (x - per_sample(s_s, x) * eps) / per_sample(a_s, x)  # data prediction x_θ  [B, C, H, W]
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
    # first order: x_prev = (σ_t/σ_s) x - α_t (e^{-h} - 1) x_θ; second order adds the D1 term.
    x_prev = (per_sample(s_t / s_s, x) * x + per_sample(-a_t * phi, x) * x0
              + per_sample(d1_coef, x) * (x0 - state.x0_prev))
    new_state = DPMSolverState(x0_prev=x0, lambda_prev=lam_s, has_history=torch.ones_like(state.has_history))
    return x_prev.to(x_t.dtype), new_state
