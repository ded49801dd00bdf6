"""What the policy chooses between: every served model x each sampler setting its manifest allows, with the
quality `genserve evaluate` measured for exactly that setting, and how much engine work one image costs.

Quality is FD (lower is better; the ranking key) and class accuracy (a floor and the tie-break). A setting
with no measurement of its own has `quality=None` and is never chosen by `auto`: the policy promises only
quality it measured (a response says "FD 47.0" because someone sampled 3000+ images at that setting).
A prior such as "more steps are never worse" would add nothing safe: ranked below the measured setting it
is never chosen, and ranked above, the policy would spend 2.5x the compute on an unmeasured gain.
Explicitly requested, an unmeasured setting is served as usual.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from core.contracts import IMAGE_SHAPE, NULL_CLASS
from core.settings import Quality, SamplingSetting
from model_store.manifest import Manifest
from serving.config import ITERATIVE_GRAPH, ONE_PASS_GRAPH

PIXELS = math.prod(IMAGE_SHAPE[1:])  # PixelCNN: one engine step per pixel

# goal -> the families that can serve it: exact likelihood needs a flow or PixelCNN; latent work a VAE
GOAL_FAMILIES = {"sample": frozenset(ONE_PASS_GRAPH) | frozenset(ITERATIVE_GRAPH),
                 "likelihood": frozenset({"flow", "pixelcnn"}),
                 "latent": frozenset({"vae"})}

# Tiers are floors; within the floor the policy always takes the best quality that meets the deadline.
#   draft     no floor: anything that makes the deadline
#   standard  class accuracy >= 0.8: at least 4 in 5 images read as the class asked for (today GAN and
#             diffusion; the VAE's 0.7999 misses by a hair, flow and PixelCNN by far)
#   best      FD within 10% of the best measured candidate for the request's goal: differences that small
#             are within FD's sampling noise at 3000-10000 samples, so they are all "the best"
TIERS = ("draft", "standard", "best")
STANDARD_MIN_ACCURACY = 0.8
BEST_FD_SLACK = 1.10


@dataclass(frozen=True)
class QualityFloor:
    max_fd: float | None = None
    min_class_accuracy: float | None = None

    def admits(self, q: Quality) -> bool:
        return ((self.max_fd is None or q.fd <= self.max_fd) and
                (self.min_class_accuracy is None or q.class_accuracy >= self.min_class_accuracy))


@dataclass(frozen=True)
class Candidate:
    model: str                   # served model name (its deployment)
    family: str
    iterative: bool              # step-batched engine (diffusion, pixelcnn) or one forward
    setting: SamplingSetting     # the full sampling setting (sampler, steps, guidance_scale / temperature)
    quality: Quality | None      # None: never measured at this setting

    @property
    def label(self) -> str:
        """Short and unique per model, e.g. 'diffusion dpmpp_2m/20 g=2.0', 'flow T=0.7', 'gan'."""
        s = self.setting
        parts = [self.model]
        if s.sampler is not None:
            parts.append(f"{s.sampler}/{s.steps}")
        parts += [f"{name}={v}" for name, v in (("g", s.guidance_scale), ("T", s.temperature)) if v is not None]
        return " ".join(parts)

    def steps(self) -> int:
        """Engine steps per request: sampler steps (diffusion), one per pixel (PixelCNN), one forward (one-pass)."""
        if not self.iterative:
            return 1
        return self.setting.steps if self.setting.steps is not None else PIXELS

    def units(self, n: int, class_id: int) -> int:
        """Rows per engine step (images per forward for one-pass): classifier-free guidance adds an
        unconditional row per image, except for classless requests (as DiffusionRequest.rows)."""
        return n * (2 if self.setting.guided(class_id, NULL_CLASS) else 1)

    def rank(self) -> tuple[float, float]:
        """Sort key, best first: FD, then class accuracy."""
        return (self.quality.fd, -self.quality.class_accuracy)


def candidates_of(model: str, manifest: Manifest) -> list[Candidate]:
    """Every setting the manifest allows (its default when it lists none)."""
    iterative = manifest.family in ITERATIVE_GRAPH
    settings = manifest.sampling.allowed or [manifest.sampling.default]
    return [Candidate(model, manifest.family, iterative, s, manifest.quality(s)) for s in settings]


def explicit_candidate(model: str, manifest: Manifest, overrides: SamplingSetting) -> Candidate:
    """What a request naming the model gets: the manifest's default with the request's own settings over it."""
    setting = overrides.over(manifest.sampling.default)
    return Candidate(model, manifest.family, manifest.family in ITERATIVE_GRAPH, setting, manifest.quality(setting))


def tier_floor(tier: str | None, eligible: list[Candidate]) -> QualityFloor:
    """The floor a tier sets among `eligible` (measured candidates that can serve the request's goal)."""
    if tier in (None, "draft"):
        return QualityFloor()
    if tier == "standard":
        return QualityFloor(min_class_accuracy=STANDARD_MIN_ACCURACY)
    if tier == "best":
        best = min((c.quality.fd for c in eligible), default=math.inf)
        return QualityFloor(max_fd=best * BEST_FD_SLACK)
    raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
