"""Sample-quality metrics: pure functions over feature arrays.

Inputs are feature embeddings of images, shaped [N, D] (N samples, D feature
dimensions), e.g. the penultimate layer of a Fashion-MNIST classifier. Nothing
here knows about models or torch; all maths is numpy float64.

Pairwise distances use the matrix-multiply form ||a||^2 + ||b||^2 - 2 a.b and are
computed CHUNK_ROWS rows at a time, so 10,000 x 10,000 points never materialise
a full distance matrix (one chunk of 1000 x 10,000 float64 is 80 MB).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import scipy.linalg

# Rows of the left operand per distance block; 1000 x 10,000 float64 = 80 MB.
CHUNK_ROWS = 1000

# Points sampled for the mean pairwise distance: 2000 points give ~2M pairs,
# enough for a stable mean, at ~4M distance evaluations instead of N^2.
DEFAULT_PAIRWISE_SAMPLE = 2000

# Two samples of one distribution give a diversity ratio within a few percent
# of 1 (sampling noise of a 2000-point estimate is far smaller than 20%), so 0.8
# rarely raises a false alarm, while a generator whose samples spread a fifth
# less than the data is already producing visibly fewer distinct images. A
# heuristic, not from a paper: re-tune it if real checkpoints disagree.
MODE_COLLAPSE_THRESHOLD = 0.8


def _as_features(name: str, features: np.ndarray, min_rows: int = 1) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [N, D] array, got shape {x.shape}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {x.shape[0]}")
    return x


def _squared_distance_blocks(
    a: np.ndarray, b: np.ndarray, chunk_rows: int
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (row offset, squared distances [rows, len(b)]) for row chunks of a."""
    b_sq = np.einsum("ij,ij->i", b, b)  # [Nb]
    for start in range(0, a.shape[0], chunk_rows):
        block = a[start : start + chunk_rows]
        block_sq = np.einsum("ij,ij->i", block, block)  # [rows]
        d2 = block @ b.T  # [rows, Nb]; built in place to hold one block, not three
        d2 *= -2.0
        d2 += block_sq[:, None]
        d2 += b_sq[None, :]
        # Cancellation can leave tiny negatives where the true distance is 0.
        np.maximum(d2, 0.0, out=d2)
        yield start, d2


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of [N, D] features (the FID Gaussian fit)."""
    x = _as_features("features", features, min_rows=2)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to
    a Local Nash Equilibrium" (the FID formula):
        d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).
    Inputs are means [D] and covariances [D, D], e.g. from `feature_stats`.
    Follows the pytorch-fid reference for numerical robustness: if the product is
    singular, eps * I is added to both diagonals; a negligible imaginary part of
    the square root (numerical error) is dropped, a large one raises ValueError.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"means must be 1-D of equal length, got {mu1.shape} and {mu2.shape}")
    dim = mu1.shape[0]
    if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"covariances must be [{dim}, {dim}], got {sigma1.shape} and {sigma2.shape}"
        )

    diff = mu1 - mu2
    covmean, singular = _sqrtm(sigma1 @ sigma2)
    if singular:
        offset = np.eye(dim) * eps
        covmean, _ = _sqrtm((sigma1 + offset) @ (sigma2 + offset))

    if np.iscomplexobj(covmean):
        max_imag = np.max(np.abs(np.diagonal(covmean).imag))
        if max_imag > 1e-3:  # same tolerance as pytorch-fid
            raise ValueError(f"sqrt(sigma1 @ sigma2) has imaginary component {max_imag:.3g}")
        covmean = covmean.real

    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _sqrtm(matrix: np.ndarray) -> tuple[np.ndarray, bool]:
    """Matrix square root, and whether scipy found the input singular.

    Older scipy signals singularity with inf/nan entries, newer with a LinAlgWarning.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(matrix)
    singular = not np.isfinite(root).all() or any(
        issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught
    )
    return root, singular


def frechet_distance_between(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID-style Fréchet distance between two [N, D] feature sets (Heusel et al. 2017)."""
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))


def _knn_radii_squared(x: np.ndarray, k: int, chunk_rows: int) -> np.ndarray:
    """Squared distance from each point of x to its k-th nearest other point. [N]"""
    radii = np.empty(x.shape[0])
    for start, d2 in _squared_distance_blocks(x, x, chunk_rows):
        rows = np.arange(d2.shape[0])
        d2[rows, start + rows] = 0.0  # the point itself, exactly, despite rounding
        # Index 0 of the sorted row is the point itself, so index k is the k-th neighbour.
        radii[start : start + d2.shape[0]] = np.partition(d2, k, axis=1)[:, k]
    return radii


def precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int = 3, chunk_rows: int = CHUNK_ROWS
) -> tuple[float, float]:
    """Improved precision and recall of fake [M, D] against real [N, D] features.

    Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
    Generative Models". Each set's manifold is the union of balls around its
    points, with radius the distance to the point's k-th nearest neighbour within
    its own set (the point itself excluded).
      precision = fraction of fake points inside at least one real ball (fidelity);
      recall    = fraction of real points inside at least one fake ball (coverage).
    Memory is O(chunk_rows * max(N, M)); the fake-vs-real distances are computed
    once and serve both directions.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    real = _as_features("real", real, min_rows=k + 1)
    fake = _as_features("fake", fake, min_rows=k + 1)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: real {real.shape[1]}, fake {fake.shape[1]}")

    real_radii = _knn_radii_squared(real, k, chunk_rows)  # [N]
    fake_radii = _knn_radii_squared(fake, k, chunk_rows)  # [M]

    fake_in_real = np.zeros(fake.shape[0], dtype=bool)  # [M]
    real_in_fake = np.zeros(real.shape[0], dtype=bool)  # [N]
    for start, d2 in _squared_distance_blocks(fake, real, chunk_rows):  # d2: [rows, N]
        fake_in_real[start : start + d2.shape[0]] = (d2 <= real_radii[None, :]).any(axis=1)
        real_in_fake |= (d2 <= fake_radii[start : start + d2.shape[0], None]).any(axis=0)

    return float(fake_in_real.mean()), float(real_in_fake.mean())


def mean_pairwise_distance(
    features: np.ndarray,
    max_pairs_sample: int | None = DEFAULT_PAIRWISE_SAMPLE,
    seed: int = 0,
) -> float:
    """Mean Euclidean distance over distinct pairs of [N, D] features.

    A sample-diversity statistic (as used for mode-collapse checks, e.g. the
    pairwise-distance diversity score of Zhu et al. 2017, BicycleGAN). If N exceeds
    max_pairs_sample, a fixed-seed random subset of that many points is used, so
    the estimate is cheap and reproducible; None uses every point.
    """
    x = _as_features("features", features, min_rows=2)
    if max_pairs_sample is not None:
        if max_pairs_sample < 2:
            raise ValueError(f"max_pairs_sample must be >= 2 or None, got {max_pairs_sample}")
        if x.shape[0] > max_pairs_sample:
            idx = np.random.default_rng(seed).choice(x.shape[0], max_pairs_sample, replace=False)
            x = x[idx]

    n = x.shape[0]
    total = 0.0
    for start, d2 in _squared_distance_blocks(x, x, CHUNK_ROWS):
        rows = np.arange(d2.shape[0])
        d2[rows, start + rows] = 0.0  # self-pairs are excluded from the mean
        total += np.sqrt(d2).sum()
    return total / (n * (n - 1))


def diversity_ratio(
    fake: np.ndarray,
    real: np.ndarray,
    max_pairs_sample: int | None = DEFAULT_PAIRWISE_SAMPLE,
    seed: int = 0,
) -> float:
    """mean_pairwise_distance(fake) / mean_pairwise_distance(real).

    About 1 when the generator is as diverse as the data; a mode-collapsed
    generator scores well below 1 (see MODE_COLLAPSE_THRESHOLD).
    """
    real_spread = mean_pairwise_distance(real, max_pairs_sample, seed)
    if real_spread == 0.0:
        raise ValueError("real features are all identical; diversity ratio is undefined")
    return mean_pairwise_distance(fake, max_pairs_sample, seed) / real_spread


def class_accuracy(predicted: np.ndarray, requested: np.ndarray) -> float:
    """Fraction of samples whose classifier-predicted label equals the requested one.

    For class-conditional generation: predicted [N] are labels a Fashion-MNIST
    classifier assigns to the generated images, requested [N] the labels asked for.
    """
    predicted = np.asarray(predicted)
    requested = np.asarray(requested)
    if predicted.ndim != 1 or predicted.shape != requested.shape:
        raise ValueError(
            f"predicted and requested must be 1-D of equal length, "
            f"got {predicted.shape} and {requested.shape}"
        )
    if predicted.size == 0:
        raise ValueError("class_accuracy needs at least one label")
    return float(np.mean(predicted == requested))
