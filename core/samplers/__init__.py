"""Pure sampler step maths for the diffusion family: batched tensors, per-sample coefficients, explicit
per-request state; SAMPLERS maps each sampler's name to its step function."""

from core.samplers.ddim import ddim_step
from core.samplers.dpm_solver import DPMSolverState, dpm_solver_pp_2m_step
from core.samplers.guidance import classifier_free_guidance, guided_eps
from core.samplers.registry import SAMPLERS, NoState, Sampler, StepRows, sampler
from core.samplers.schedule import (FINAL_TIMESTEP, NUM_TRAIN_TIMESTEPS, alphas_at, inference_timesteps,
                                    linear_alphas_cumprod)

__all__ = ["FINAL_TIMESTEP", "NUM_TRAIN_TIMESTEPS", "SAMPLERS", "DPMSolverState", "NoState", "Sampler", "StepRows",
           "alphas_at", "classifier_free_guidance", "ddim_step", "dpm_solver_pp_2m_step", "guided_eps",
           "inference_timesteps", "linear_alphas_cumprod", "sampler"]
