"""Pure sampler step maths for the diffusion family: batched tensors, per-sample coefficients, explicit state."""

from core.samplers.ddim import ddim_step
from core.samplers.dpm_solver import DPMSolverState, dpm_solver_pp_2m_step
from core.samplers.schedule import (FINAL_TIMESTEP, NUM_TRAIN_TIMESTEPS, alphas_at, inference_timesteps,
                                       linear_alphas_cumprod)

__all__ = ["FINAL_TIMESTEP", "NUM_TRAIN_TIMESTEPS", "DPMSolverState", "alphas_at", "ddim_step",
           "dpm_solver_pp_2m_step", "inference_timesteps", "linear_alphas_cumprod"]
