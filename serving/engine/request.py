"""What a client asks for (immutable, validated request types), what the engine tracks for it while it
runs (its tensors and generator, on top of state.py's torch-free bookkeeping), how it ended (output), and
the errors its waiter sees."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from core.contracts import NULL_CLASS, NUM_TRAIN_TIMESTEPS
from core.contracts import NUM_PIXELS
from core.samplers import SAMPLERS, inference_timesteps
from serving.engine.state import RequestState, Status  # noqa: F401 (Status re-exported)
from serving.errors import DeadlineExceeded, RequestAborted, RequestCancelled, RequestFailed  # noqa: F401 (re-exported)

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range


def _int_in(value, lo: int, hi: float = math.inf) -> bool:
    """value is an int (not a bool) in [lo, hi]."""
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _check_common(class_id: int, seed: int, n: int, deadline: float | None) -> None:
    """Checks every request type shares; messages name the field and the value received."""
    if not _int_in(class_id, 0, NULL_CLASS):
        raise ValueError(f"class_id must be an integer in [0, {NULL_CLASS}] ({NULL_CLASS} = no class), "
                         f"got {class_id!r}")
    if not _int_in(seed, 0, MAX_SEED):
        raise ValueError(f"seed must be an integer in [0, 2**64 - 1], got {seed!r}")
    if not _int_in(n, 1):
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if deadline is not None and not (isinstance(deadline, (int, float)) and math.isfinite(deadline)):
        raise ValueError(f"deadline must be a finite time.monotonic() value or None, got {deadline!r}")


@dataclass(frozen=True)
class DiffusionRequest:
    """n images of one class from the diffusion denoiser; validated on construction."""

    class_id: int                  # 0..9, or NULL_CLASS for unconditional
    sampler: str = "dpmpp_2m"      # "ddim" | "dpmpp_2m"
    steps: int = 20                # denoiser forwards per image (x2 rows when guided)
    guidance_scale: float = 1.0    # classifier-free guidance s; 1 = plain conditional, one row per image
    eta: float = 0.0               # DDIM stochasticity in [0, 1]; 0 for dpmpp_2m
    seed: int = 0                  # seeds the request's own generator: x_T and DDIM noise
    n: int = 1                     # images
    deadline: float | None = None  # absolute time.monotonic(); past it the request is dropped

    def __post_init__(self):
        _check_common(self.class_id, self.seed, self.n, self.deadline)
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, got {self.sampler!r}")
        if not _int_in(self.steps, 1, NUM_TRAIN_TIMESTEPS):
            raise ValueError(f"steps must be an integer in [1, {NUM_TRAIN_TIMESTEPS}], got {self.steps!r}")
        if not (isinstance(self.guidance_scale, (int, float)) and 0.0 <= self.guidance_scale < math.inf):
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale!r}")
        if not (isinstance(self.eta, (int, float)) and 0.0 <= self.eta <= 1.0):
            raise ValueError(f"eta must be in [0, 1], got {self.eta!r}")
        if self.eta != 0.0 and not SAMPLERS[self.sampler].stochastic:
            raise ValueError(f"eta applies only to the 'ddim' sampler, got eta={self.eta} with {self.sampler!r}")

    @property
    def guided(self) -> bool:
        """Whether each image needs an unconditional row too. For NULL_CLASS both rows would be the
        same forward, and ε_u + s (ε_u - ε_u) = ε_u whatever s: one row does."""
        return self.guidance_scale != 1.0 and self.class_id != NULL_CLASS

    @property
    def rows(self) -> int:
        """Denoiser rows this request takes in every forward: the unit of the batch budget."""
        return self.n * (2 if self.guided else 1)


@dataclass(frozen=True)
class PixelCNNRequest:
    """n images of one class from the PixelCNN, one pixel per step; validated on construction."""

    class_id: int                  # 0..9, or NULL_CLASS for unconditional
    temperature: float = 1.0       # logits are divided by it: < 1 sharper, > 1 more diverse
    seed: int = 0                  # seeds the request's own generator: one uniform per image per pixel
    n: int = 1                     # images
    deadline: float | None = None  # absolute time.monotonic(); past it the request is dropped

    def __post_init__(self):
        _check_common(self.class_id, self.seed, self.n, self.deadline)
        if not (isinstance(self.temperature, (int, float)) and 0.0 < self.temperature < math.inf):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")

    @property
    def rows(self) -> int:
        """PixelCNN rows this request takes in every forward: one per image."""
        return self.n


Request = DiffusionRequest | PixelCNNRequest


@dataclass(eq=False, kw_only=True)
class DiffusionState(RequestState):
    """A diffusion request in the engine: its x_t and its sampler's history."""

    request: DiffusionRequest
    generator: torch.Generator                          # the request's own, seeded from request.seed
    timesteps: list[int] = field(default_factory=list)  # descending training timesteps, one per step
    x: torch.Tensor | None = None                       # [n, 1, 28, 28] float32: x_t, then x_0 when done
    solver: Any = None                                  # the sampler's state of the n images (SAMPLERS[..].state)


@dataclass(eq=False, kw_only=True)
class PixelCNNState(RequestState):
    """A PixelCNN request in the engine: its image, sampled up to pixel steps_done."""

    request: PixelCNNRequest
    generator: torch.Generator     # the request's own, seeded from request.seed
    x: torch.Tensor | None = None  # [n, 1, 28, 28] float32 levels 0..255: pixels before steps_done are sampled


def make_state(request_id: str, request: Request, now: float) -> RequestState:
    """The state of a newly added request. x_T is drawn here as randn([n, 1, 28, 28], generator) from a
    fresh generator seeded with request.seed, before any step noise: exactly what
    `loop.sample(x_T=randn(shape, generator=g), generator=g)` and families.diffusion.sample do."""
    generator = torch.Generator().manual_seed(request.seed)
    shape = (request.n, 1, 28, 28)
    common = dict(request_id=request_id, n=request.n, rows=request.rows, arrival=now, deadline=request.deadline,
                  request=request, generator=generator)
    if isinstance(request, DiffusionRequest):
        x_T = torch.randn(shape, generator=generator)
        return DiffusionState(steps_total=request.steps, timesteps=inference_timesteps(request.steps), x=x_T,
                              solver=SAMPLERS[request.sampler].state.initial(x_T), **common)
    if isinstance(request, PixelCNNRequest):
        return PixelCNNState(steps_total=NUM_PIXELS, x=torch.zeros(shape), **common)
    raise TypeError(f"unknown request type {type(request).__name__}")


@dataclass
class RequestOutput:
    """How one request ended; the engine's step returns these."""

    request_id: str
    status: Status                      # FINISHED, CANCELLED, EXPIRED or FAILED
    images: torch.Tensor | None         # [n, 1, 28, 28] uint8 when FINISHED
    error: RequestAborted | None = None  # why there are no images otherwise

    def result(self) -> torch.Tensor:
        """The images, or raise the error."""
        if self.error is not None:
            raise self.error
        return self.images
