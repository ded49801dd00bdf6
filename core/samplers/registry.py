"""Sampler name -> its step function, behind one signature: the step-batched engine and the offline loop
both dispatch through SAMPLERS, so a new sampler is one entry here and one file of maths.

Every step function takes a batch of images whose rows may belong to different requests (per-row
coefficients) and returns the next x and the rows' new sampler state. State is batched on dim 0 and
supports `type.initial(x_T)`, `type.cat(states)` and `state[index]`, so the engine can gather the rows of
the requests that use a sampler, step them together, and split the state back per request."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from core.samplers.ddim import ddim_step
from core.samplers.dpm_solver import DPMSolverState, dpm_solver_pp_2m_step
from core.settings import DDIM, DPMPP_2M


class NoState:
    """The state of a sampler without history (DDIM): it slices and concatenates to itself."""

    @classmethod
    def initial(cls, x_T: torch.Tensor) -> NoState:
        return NO_STATE

    @staticmethod
    def cat(states: list[NoState]) -> NoState:
        return NO_STATE

    def __getitem__(self, index) -> NoState:
        return self


NO_STATE = NoState()


@dataclass(frozen=True)
class StepRows:
    """Per-row inputs of one sampler step beyond x_t and ε, all [B]."""

    alpha_t: torch.Tensor             # ᾱ at the row's current timestep
    alpha_prev: torch.Tensor          # ᾱ at the timestep it steps to (1.0 after the last step)
    last: torch.Tensor                # bool: this is the row's final step
    eta: torch.Tensor                 # float64: DDIM stochasticity (0 for every other sampler)
    noise: torch.Tensor | None        # [B, C, H, W] ~ N(0, I) from each request's generator; None when all eta = 0


# step(x_t, eps, rows, state, clip_x0) -> (x_prev, state)
StepFn = Callable[[torch.Tensor, torch.Tensor, StepRows, Any, bool], tuple[torch.Tensor, Any]]


@dataclass(frozen=True)
class Sampler:
    name: str
    step: StepFn
    state: type                        # NoState or DPMSolverState: initial / cat / [index]
    stochastic: bool                   # takes eta > 0 (and then step noise)


def _ddim(x_t, eps, rows: StepRows, state: NoState, clip_x0: bool):
    return ddim_step(x_t, eps, rows.alpha_t, rows.alpha_prev, rows.eta, rows.noise, clip_x0=clip_x0), state


def _dpmpp_2m(x_t, eps, rows: StepRows, state: DPMSolverState, clip_x0: bool):
    # the last step is first order, as diffusers' lower_order_final default
    return dpm_solver_pp_2m_step(x_t, eps, rows.alpha_t, rows.alpha_prev, state, rows.last, clip_x0=clip_x0)


SAMPLERS: dict[str, Sampler] = {
    DDIM: Sampler(DDIM, _ddim, NoState, stochastic=True),
    DPMPP_2M: Sampler(DPMPP_2M, _dpmpp_2m, DPMSolverState, stochastic=False),
}


def sampler(name: str) -> Sampler:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, got {name!r}") from None
