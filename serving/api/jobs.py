"""What the ingress hands a model deployment, and what comes back: the one internal protocol every public
API (OpenAI today, KServe next) is translated to. Jobs are validated at the edge; deployments trust them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GenerationJob:
    """n images from one model, validated by the API layer."""

    class_id: int                        # 0..9, or NULL_CLASS (10) for unconditional
    n: int                               # images, >= 1 (a one-pass request larger than a batch spans several)
    seed: int                            # seeds the request's own generator: its images depend on nothing else
    sampler: str | None = None           # diffusion only; None = the manifest's default
    steps: int | None = None             # diffusion only; None = the manifest's default
    guidance_scale: float | None = None  # diffusion only; None = the manifest's default
    timeout_s: float | None = None       # latency SLO from arrival at the replica; None = no deadline there


@dataclass
class GenerationResult:
    images: np.ndarray          # uint8 [n, 28, 28]
    model: str                  # which model and version made them
    version: str
    family: str
    replica_ms: float           # from the job reaching the replica to its images being ready
    settings: dict              # the sampling settings used (e.g. sampler, steps, guidance_scale, temperature)


@dataclass(frozen=True)
class ModelInfo:
    """What a model deployment serves, for GET /v1/models."""

    name: str
    version: str
    family: str
    created_at: str             # the version's publish time, ISO 8601 UTC
    path: str                   # "one-pass" | "iterative"
    provider: str               # ONNX Runtime's execution provider
    threads: int                # intra-op threads per session
    settings: dict              # the deployment's live user_config
