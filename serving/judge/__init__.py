"""The cascade's judge: the committed Fashion-MNIST classifier (checkpoints/classifier), published as the
model `judge` (genserve build) and served beside the generative models as a small deployment
(deployment.py) that scores images: its confidence that each one shows the class it was asked for.
serving/api/cascade.py escalates the images scoring under the request's threshold.

This module is what the ingress imports: the job and the score, no runtime."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.contracts import NULL_CLASS

JUDGE = "judge"   # its model name in the store and its deployment's name


@dataclass(frozen=True)
class ScoreJob:
    """Images to judge, each against its own class."""

    images: np.ndarray                  # uint8 [n, 28, 28]
    class_ids: tuple[int, ...]          # n: the class each image was asked for; NULL_CLASS: none asked
    timeout_s: float | None = None      # what is left of the request's deadline (the ingress cuts the call)


def confidence(logits: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
    """logits [n, 10], class_ids [n] -> [n]: p(the class asked for | image), a softmax in float64; for an
    image asked without a class, p(its most likely class): it should at least look like some garment."""
    z = logits.astype(np.float64)
    probs = np.exp(z - z.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    top = probs.max(axis=1)
    asked = probs[np.arange(len(probs)), np.minimum(class_ids, NULL_CLASS - 1)]
    return np.where(class_ids == NULL_CLASS, top, asked)
