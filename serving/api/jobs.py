"""What the ingress hands a model deployment, and what comes back: the one internal protocol every public
API (OpenAI today, KServe next) is translated to. Jobs are validated at the edge; deployments trust them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from core.settings import SamplingSetting
from model_store.manifest import Manifest
from serving.operations import operations_of

if TYPE_CHECKING:  # the ingress imports this module, and must not import ONNX Runtime
    from serving.runtime import Threads


@dataclass(frozen=True)
class GenerationJob:
    """n images from one model, validated by the API layer. One seed (and class) for all n images, or one per
    image (KServe v2): image i of a job with `seeds` is then the image of the 1-image job with seed seeds[i]
    and class class_ids[i], whatever else the job holds."""

    class_id: int                        # 0..9, or NULL_CLASS (10) for unconditional
    n: int                               # images, >= 1 (a one-pass request larger than a batch spans several)
    seed: int                            # seeds the request's own generator: its images depend on nothing else
    # diffusion's sampler, steps, guidance_scale: the request's own or the policy's; None fields = the default
    setting: SamplingSetting = SamplingSetting()
    timeout_s: float | None = None       # latency SLO from arrival at the replica; None = no deadline there
    seeds: tuple[int, ...] | None = None      # n: image i's own generator's seed (seed is then ignored)
    # n: image i's class. class_id is then the one admission costs the job by: a conditional one if any image
    # has one, as a guided image takes two rows
    class_ids: tuple[int, ...] | None = None
    previews: int = 0                    # partial images streamed before the final ones (iterative families)


@dataclass(frozen=True)
class PolicyHints:
    """What a request asks of the latency/quality policy beyond its job: OpenAI body extras, KServe
    parameters. The SLO itself is the job's timeout_s."""

    tier: str | None = None                 # draft | standard | best (serving.policy.TIERS)
    max_fd: float | None = None             # an explicit quality floor, with or instead of the tier
    min_class_accuracy: float | None = None
    goal: str = "sample"                    # sample | likelihood (flow, pixelcnn) | latent (vae)
    best_effort: bool = False               # nothing fits the SLO: the fastest candidate rather than a 429
    cascade: bool = False                   # one-pass first; diffusion for the images the judge fails (serving.api.cascade)
    cascade_threshold: float | None = None  # the judge's confidence an image needs to skip diffusion; None: the default


@dataclass
class GenerationResult:
    images: np.ndarray          # uint8 [n, 28, 28]
    model: str                  # which model and version made them
    version: str
    family: str
    replica_ms: float           # from the job reaching the replica to its images being ready
    settings: SamplingSetting   # the sampling setting used, in full (the model's default filled in)
    policy: dict | None = None  # the ingress's account of the policy's choice (serving.api.admission)
    node: str = ""              # IP address of the Ray node whose replica made them
    walk: tuple[str, str] | None = None  # interpolate: its endpoints ("seeds" | "images") and path ("slerp" | "lerp")


@dataclass
class GenerationPreview:
    """A partial result of a streamed generation (GenerationJob.previews > 0), before its GenerationResult:
    diffusion's current prediction of the clean images (x̂₀), PixelCNN's pixels sampled so far."""

    images: np.ndarray          # uint8 [n, 28, 28]
    index: int                  # 0, 1, ... in the order they were taken (OpenAI's partial_image_index)
    step: int                   # engine steps done when it was taken
    steps: int                  # engine steps the job takes in all
    model: str
    version: str
    family: str
    replica_ms: float           # from the job reaching the replica to this preview


@dataclass(frozen=True)
class ReplicaLoad:
    """A model replica's live load, as its stats() reports it to the ingress's admission a few times a second.
    Units are rows of the step engine's batch (a guided image takes two) or images of the one-pass batcher."""

    running_units: int = 0      # rows in the step batch / images in the forward in flight
    running_requests: int = 0
    running_steps: float = 0.0  # steps the running requests still need, summed over them (one-pass: 1)
    queued_units: int = 0       # rows / images waiting to start
    queued_requests: int = 0
    queued_steps: float = 0.0   # steps the waiting requests need, summed over them
    budget: int | None = None   # the live row / image budget (reconfigure changes it); None: unknown


@dataclass(frozen=True)
class ModelInfo:
    """What a model deployment serves, for GET /v1/models."""

    name: str
    version: str
    family: str
    created_at: str             # the version's publish time, ISO 8601 UTC
    path: str                   # "one-pass" | "iterative"
    provider: str               # ONNX Runtime's execution provider
    threads: int                # intra-op threads per session: the replica's reserved CPUs
    settings: dict              # the deployment's live user_config
    operations: tuple[str, ...] = ("generate",)  # what it does: + interpolate, reconstruct (vae), likelihood
    metrics: dict = field(default_factory=dict)  # quality from `genserve evaluate` (manifest, by_setting left out)
    latency: dict | None = None  # the manifest's latency profile: ms per forward per graph and batch, machine
    node_threads: int | None = None  # threads while its node's other replicas are idle (serving.runtime.cores)

    @classmethod
    def describe(cls, manifest: Manifest, *, path: str, provider: str, threads: Threads, settings: dict) -> ModelInfo:
        """A served version, from its manifest: identity, operations, quality and latency profile."""
        return cls(manifest.model, manifest.version, manifest.family, manifest.created_at, path, provider,
                   threads.reserved, settings, operations_of(manifest.family),
                   {k: v for k, v in manifest.metrics.items() if k != "by_setting"},
                   manifest.latency.to_dict() if manifest.latency else None, threads.node)


# ---- the families' own operations (serving/operations.py has their maths) -------------------------------

@dataclass(frozen=True)
class InterpolationJob:
    """A walk through a VAE's latent space between two endpoints, decoded at every frame."""

    class_id: int                           # every frame is decoded (and endpoint images encoded) with it
    frames: int                             # images on the path, both endpoints included, >= 2
    seeds: tuple[int, int] | None = None    # endpoints: these seeds' prior latents (= their 1-image samples)...
    images: np.ndarray | None = None        # ...or the encodings of these two images, uint8 [2, 28, 28]


@dataclass(frozen=True)
class ImagesJob:
    """Images in, one answer per image: reconstruction (vae) or exact log-likelihood (flow, pixelcnn)."""

    images: np.ndarray                      # uint8 [n, 28, 28], n >= 1
    class_id: int                           # condition on this class; NULL_CLASS: the unconditional model
    seed: int = 0                           # the flow's dequantization noise, so a result can be reproduced


@dataclass
class ReconstructionResult:
    images: np.ndarray          # uint8 [n, 28, 28]: the decoder's mean at the encoder's mean
    mse: np.ndarray             # float [n]: mean squared error per pixel, [0, 1] scale (the anomaly score)
    model: str
    version: str
    family: str
    replica_ms: float


@dataclass
class LikelihoodResult:
    bits_per_dim: np.ndarray    # float [n]: -log2 p(x | class) / 784 of each 8-bit image
    model: str
    version: str
    family: str
    replica_ms: float
