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
from serving.engine.state import RequestState, Status, preview_steps  # noqa: F401 (Status re-exported)
from serving.errors import DeadlineExceeded, RequestAborted, RequestCancelled, RequestFailed  # noqa: F401 (re-exported)

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range
MAX_PREVIEWS = 3      # partial images a request may stream, as OpenAI's partial_images allows


def _int_in(value, lo: int, hi: float = math.inf) -> bool:
    """value is an int (not a bool) in [lo, hi]."""
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _check_common(class_id: int, seed: int, n: int, deadline: float | None, previews: int = 0) -> None:
    """Checks every request type shares; messages name the field and the value received."""
    if not _int_in(previews, 0, MAX_PREVIEWS):
        raise ValueError(f"previews must be an integer in [0, {MAX_PREVIEWS}], got {previews!r}")
    if not _int_in(class_id, 0, NULL_CLASS):
        raise ValueError(f"class_id must be an integer in [0, {NULL_CLASS}] ({NULL_CLASS} = no class), "
                         f"got {class_id!r}")
    if not _int_in(seed, 0, MAX_SEED):
        raise ValueError(f"seed must be an integer in [0, 2**64 - 1], got {seed!r}")
    if not _int_in(n, 1):
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if deadline is not None and not (isinstance(deadline, (int, float)) and math.isfinite(deadline)):
        raise ValueError(f"deadline must be a finite time.monotonic() value or None, got {deadline!r}")


def _check_per_image(class_ids: tuple[int, ...] | None, seeds: tuple[int, ...] | None, n: int) -> None:
    """Per-image class ids and seeds: None, or n values each valid as class_id / seed."""
    for name, values in (("class_ids", class_ids), ("seeds", seeds)):
        if values is not None and (not isinstance(values, tuple) or len(values) != n):
            raise ValueError(f"{name} must be None or a tuple of n = {n} values, got {values!r}")
    for class_id in class_ids or ():
        _check_common(class_id, 0, 1, None)
    for seed in seeds or ():
        _check_common(0, seed, 1, None)


class _PerImage:
    """What both request types derive from their class_id / class_ids and guidance_scale."""

    @property
    def classes(self) -> tuple[int, ...]:
        """Each image's class."""
        return self.class_ids if self.class_ids is not None else (self.class_id,) * self.n

    @property
    def guided_images(self) -> tuple[bool, ...]:
        """Whether each image needs an unconditional row too. Not for NULL_CLASS: both rows would be the same
        forward, and guidance u + s (u - u) = u whatever s, so one row does."""
        return tuple(self.guidance_scale != 1.0 and c != NULL_CLASS for c in self.classes)

    @property
    def rows(self) -> int:
        """Rows this request takes in every forward (one per image, two for a guided one): the batch budget's unit."""
        return self.n + sum(self.guided_images)


@dataclass(frozen=True)
class DiffusionRequest(_PerImage):
    """n images of one class from the diffusion denoiser; validated on construction."""

    class_id: int                  # 0..9, or NULL_CLASS for unconditional
    sampler: str = "dpmpp_2m"      # "ddim" | "dpmpp_2m"
    steps: int = 20                # denoiser forwards per image (x2 rows when guided)
    guidance_scale: float = 1.0    # classifier-free guidance s; 1 = plain conditional, one row per image
    eta: float = 0.0               # DDIM stochasticity in [0, 1]; 0 for dpmpp_2m
    seed: int = 0                  # seeds the request's own generator: x_T and DDIM noise
    n: int = 1                     # images
    deadline: float | None = None  # absolute time.monotonic(); past it the request is dropped
    # per image, n each (None: class_id / seed for all n): image i is then the image of the 1-image request
    # with class class_ids[i] and seed seeds[i], drawn from a generator of its own
    class_ids: tuple[int, ...] | None = None
    seeds: tuple[int, ...] | None = None
    previews: int = 0              # x̂₀ previews streamed at evenly spaced steps before the final images

    def __post_init__(self):
        _check_common(self.class_id, self.seed, self.n, self.deadline, self.previews)
        _check_per_image(self.class_ids, self.seeds, self.n)
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


@dataclass(frozen=True)
class PixelCNNRequest(_PerImage):
    """n images of one class from the PixelCNN, one pixel per step; validated on construction."""

    class_id: int                  # 0..9, or NULL_CLASS for unconditional
    temperature: float = 1.0       # logits are divided by it: < 1 sharper, > 1 more diverse
    guidance_scale: float = 1.0    # classifier-free guidance s on the logits; 1 = plain conditional, one row
    seed: int = 0                  # seeds the request's own generator: one uniform per image per pixel
    n: int = 1                     # images
    deadline: float | None = None  # absolute time.monotonic(); past it the request is dropped
    # per image, as DiffusionRequest's: image i is then the 1-image request's with class_ids[i] and seeds[i]
    class_ids: tuple[int, ...] | None = None
    seeds: tuple[int, ...] | None = None
    previews: int = 0              # the pixels sampled so far, streamed at evenly spaced steps

    def __post_init__(self):
        _check_common(self.class_id, self.seed, self.n, self.deadline, self.previews)
        _check_per_image(self.class_ids, self.seeds, self.n)
        if not (isinstance(self.temperature, (int, float)) and 0.0 < self.temperature < math.inf):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not (isinstance(self.guidance_scale, (int, float)) and 0.0 <= self.guidance_scale < math.inf):
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale!r}")


Request = DiffusionRequest | PixelCNNRequest


@dataclass(eq=False, kw_only=True)
class DiffusionState(RequestState):
    """A diffusion request in the engine: its x_t and its sampler's history."""

    request: DiffusionRequest
    generators: list[torch.Generator]                   # the request's own: one from request.seed, or one per image
    timesteps: list[int] = field(default_factory=list)  # descending training timesteps, one per step
    x: torch.Tensor | None = None                       # [n, 1, 28, 28] float32: x_t, then x_0 when done
    solver: Any = None                                  # the sampler's state of the n images (SAMPLERS[..].state)
    guided: torch.Tensor | None = None                  # [n] bool: the images with an unconditional row
    y: torch.Tensor | None = None                       # [rows] int64: each denoiser row's class (DiffusionStepper)
    x0_pred: torch.Tensor | None = None                 # [n, 1, 28, 28]: the last preview step's x̂₀


@dataclass(eq=False, kw_only=True)
class PixelCNNState(RequestState):
    """A PixelCNN request in the engine: its image, sampled up to pixel steps_done."""

    request: PixelCNNRequest
    generators: list[torch.Generator]  # the request's own: one from request.seed, or one per image
    x: torch.Tensor | None = None      # [n, 1, 28, 28] float32 levels 0..255: pixels before steps_done are sampled
    guided: torch.Tensor | None = None  # [n] bool: the images with an unconditional row
    y: torch.Tensor | None = None       # [rows] int64: each image's class, then NULL_CLASS per guided image


def make_state(request_id: str, request: Request, now: float) -> RequestState:
    """The state of a newly added request. x_T is drawn here as randn([n, 1, 28, 28], generator) from a
    fresh generator seeded with request.seed, before any step noise: exactly what
    `loop.sample(x_T=randn(shape, generator=g), generator=g)` and families.diffusion.sample do. With per-image
    seeds, each image's generator draws its row as that 1-image request's would."""
    shape = (request.n, 1, 28, 28)
    common = dict(request_id=request_id, n=request.n, rows=request.rows, arrival=now, deadline=request.deadline,
                  request=request)
    if isinstance(request, DiffusionRequest):
        common["preview_at"] = preview_steps(request.steps, request.previews)
        generators = [torch.Generator().manual_seed(s) for s in request.seeds or (request.seed,)]
        x_T = randn_rows(generators, shape)
        guided = torch.tensor(request.guided_images)
        # rows: every image's conditional row (its class), then the guided images' unconditional rows
        y = torch.tensor(request.classes + (NULL_CLASS,) * int(guided.sum()), dtype=torch.int64)
        return DiffusionState(steps_total=request.steps, timesteps=inference_timesteps(request.steps), x=x_T,
                              solver=SAMPLERS[request.sampler].state.initial(x_T), generators=generators,
                              guided=guided, y=y, **common)
    if isinstance(request, PixelCNNRequest):
        common["preview_at"] = preview_steps(NUM_PIXELS, request.previews)
        guided = torch.tensor(request.guided_images)
        return PixelCNNState(steps_total=NUM_PIXELS, x=torch.zeros(shape),
                             generators=[torch.Generator().manual_seed(s) for s in request.seeds or (request.seed,)],
                             guided=guided, y=torch.tensor(request.classes + (NULL_CLASS,) * int(guided.sum()),
                                                           dtype=torch.int64), **common)
    raise TypeError(f"unknown request type {type(request).__name__}")


def randn_rows(generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """randn(shape) with its shape[0] rows split evenly over the generators, in order: one generator draws
    them all (a request with one seed); one per row draws its row as a 1-row request would."""
    if len(generators) == 1:
        return torch.randn(shape, generator=generators[0])
    rows = shape[0] // len(generators)
    return torch.cat([torch.randn((rows, *shape[1:]), generator=g) for g in generators])


@dataclass
class RequestOutput:
    """How one request ended, or one of its previews (status RUNNING), as vLLM streams a request's outputs;
    the engine's step returns these."""

    request_id: str
    status: Status                      # RUNNING (a preview), FINISHED, CANCELLED, EXPIRED or FAILED
    images: torch.Tensor | None         # [n, 1, 28, 28] uint8 when FINISHED or a preview
    error: Exception | None = None      # why there are no images otherwise (a RequestAborted, EngineStopped)
    preview_index: int | None = None    # 0, 1, ... for a preview
    step: int = 0                       # steps done when it was made

    @property
    def finished(self) -> bool:
        return self.status is not Status.RUNNING

    def result(self) -> torch.Tensor:
        """The images, or raise the error."""
        if self.error is not None:
            raise self.error
        return self.images
