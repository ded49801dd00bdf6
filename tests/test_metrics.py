"""Known-answer tests for families.metrics (pure numpy, fast, CPU only)."""

import tracemalloc

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from families.metrics import (
    MODE_COLLAPSE_THRESHOLD,
    class_accuracy,
    diversity_ratio,
    feature_stats,
    frechet_distance,
    frechet_distance_between,
    mean_pairwise_distance,
    precision_recall,
)


def gaussian(n: int, dim: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, scale, size=(n, dim))


def clusters(centres: np.ndarray, per_cluster: int, seed: int) -> np.ndarray:
    """Isotropic unit-variance blobs around each centre; [len(centres) * per_cluster, D]."""
    rng = np.random.default_rng(seed)
    return np.concatenate([c + rng.normal(size=(per_cluster, centres.shape[1])) for c in centres])


# --- Fréchet distance (Heusel et al. 2017) ---


def test_feature_stats_matches_numpy():
    x = gaussian(200, 5, seed=0)
    mu, sigma = feature_stats(x)
    assert mu.shape == (5,) and sigma.shape == (5, 5)
    np.testing.assert_allclose(mu, x.mean(axis=0))
    np.testing.assert_allclose(sigma, np.cov(x.T))


def test_fd_of_set_with_itself_is_zero():
    x = gaussian(500, 8, seed=0)
    assert abs(frechet_distance_between(x, x)) < 1e-6


def test_fd_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_fd_full_covariances_matches_symmetric_form():
    # Tr sqrt(S1 S2) == Tr sqrt(S1^1/2 S2 S1^1/2) for SPD matrices; the latter is
    # computed here from eigendecompositions only, independently of sqrtm(S1 S2).
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    w, v = np.linalg.eigh(s1)
    s1_half = v @ np.diag(np.sqrt(w)) @ v.T
    tr_covmean = np.sum(np.sqrt(np.linalg.eigvalsh(s1_half @ s2 @ s1_half)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fd_is_symmetric_and_grows_with_mean_shift():
    a = gaussian(400, 4, seed=3)
    b = gaussian(400, 4, seed=4, scale=1.5)
    assert frechet_distance_between(a, b) == pytest.approx(frechet_distance_between(b, a), rel=1e-8)
    distances = [frechet_distance_between(a, gaussian(400, 4, seed=5, shift=s)) for s in (0, 1, 2, 4)]
    assert all(d1 < d2 for d1, d2 in zip(distances, distances[1:]))


def test_fd_singular_covariance_uses_eps_offset():
    # Rank-1 covariances: sigma1 @ sigma2 is singular; the result must still be finite and right.
    sigma = np.diag([2.0, 0.0, 0.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 0.0, 0.0])
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(1.0, abs=1e-4)


def test_fd_large_imaginary_part_raises():
    # Not a covariance: a negative eigenvalue gives sqrt with imaginary diagonal.
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([-1.0, 1.0]))


def test_fd_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="means"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))


# --- Improved precision and recall (Kynkäänniemi et al. 2019) ---


def brute_force_precision_recall(real, fake, k):
    real_radii = np.sort(cdist(real, real), axis=1)[:, k]  # column 0 is the point itself
    fake_radii = np.sort(cdist(fake, fake), axis=1)[:, k]
    d = cdist(fake, real)  # [M, N]
    precision = np.mean((d <= real_radii[None, :]).any(axis=1))
    recall = np.mean((d <= fake_radii[:, None]).any(axis=0))
    return precision, recall


def test_precision_recall_of_set_with_itself_is_one():
    x = gaussian(300, 16, seed=0)
    assert precision_recall(x, x) == (1.0, 1.0)


def test_precision_recall_against_far_shifted_set_is_zero():
    assert precision_recall(gaussian(300, 16, seed=0), gaussian(300, 16, seed=1, shift=50.0)) == (
        0.0,
        0.0,
    )


def test_half_the_modes_gives_full_precision_half_recall():
    # 10 unit blobs on a circle of radius 100 (neighbours 62 apart); the fake set
    # samples 5 of them at the same density. 2-D and k=5 so that finite-sample
    # k-NN balls cover their own distribution almost fully (in higher D with few
    # points, even identical distributions score visibly below 1).
    angles = 2 * np.pi * np.arange(10) / 10
    centres = 100.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    real = clusters(centres, per_cluster=200, seed=8)
    fake = clusters(centres[:5], per_cluster=200, seed=9)
    precision, recall = precision_recall(real, fake, k=5)
    assert precision > 0.97
    assert 0.47 < recall <= 0.5  # never above 0.5: the missing modes are not covered


def test_k_nn_radius_excludes_the_point_itself():
    # k=1 radii: 0 -> 1, 1 -> 1, 10 -> 9. Fake 5.0 lies only in the ball of 10.
    real = np.array([[0.0], [1.0], [10.0]])
    fake = np.array([[5.0], [5.5]])
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == 1.0
    # Fake radii are both 0.5: no real point within 0.5 of 5.0 or 5.5.
    assert recall == 0.0


@pytest.mark.parametrize("k", [1, 3, 5])
def test_chunked_precision_recall_matches_brute_force(k):
    real = gaussian(57, 6, seed=10)
    fake = gaussian(43, 6, seed=11, shift=0.5, scale=0.8)
    expected = brute_force_precision_recall(real, fake, k)
    got = precision_recall(real, fake, k=k, chunk_rows=7)
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0  # a non-trivial case
    assert got == pytest.approx(expected, abs=1e-12)


def test_precision_recall_memory_is_bounded_by_chunk():
    n, chunk = 3000, 300
    real = gaussian(n, 16, seed=12)
    fake = gaussian(n, 16, seed=13)
    full_matrix_bytes = n * n * 8
    tracemalloc.start()
    precision_recall(real, fake, chunk_rows=chunk)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < full_matrix_bytes / 3


def test_precision_recall_rejects_bad_arguments():
    x = gaussian(10, 3, seed=0)
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(x, x, k=0)
    with pytest.raises(ValueError, match="feature dims"):
        precision_recall(x, gaussian(10, 4, seed=0))
    with pytest.raises(ValueError, match="at least"):
        precision_recall(x[:3], x, k=3)


# --- Diversity and mode collapse ---


def test_mean_pairwise_distance_hand_cases():
    assert mean_pairwise_distance(np.array([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx(5.0)
    # Pairs on a line 0, 1, 3: distances 1, 3, 2.
    assert mean_pairwise_distance(np.array([[0.0], [1.0], [3.0]])) == pytest.approx(2.0)


def test_mean_pairwise_distance_subsample_is_seeded_and_close_to_full():
    x = gaussian(1500, 8, seed=14)
    full = mean_pairwise_distance(x, max_pairs_sample=None)
    sub = mean_pairwise_distance(x, max_pairs_sample=500, seed=3)
    assert sub == mean_pairwise_distance(x, max_pairs_sample=500, seed=3)
    assert sub == pytest.approx(full, rel=0.03)
    np.testing.assert_allclose(full, cdist(x, x).sum() / (len(x) * (len(x) - 1)), rtol=1e-10)


def test_diversity_ratio_near_one_for_same_distribution():
    ratio = diversity_ratio(gaussian(3000, 16, seed=15), gaussian(3000, 16, seed=16))
    assert ratio == pytest.approx(1.0, abs=0.03)


def test_diversity_ratio_flags_collapsed_generator():
    real = gaussian(3000, 16, seed=17)
    mode = real[0]
    collapsed = mode + 0.1 * gaussian(3000, 16, seed=18)
    assert diversity_ratio(collapsed, real) < 0.5 * MODE_COLLAPSE_THRESHOLD


def test_diversity_ratio_rejects_degenerate_real():
    with pytest.raises(ValueError, match="identical"):
        diversity_ratio(gaussian(10, 2, seed=0), np.ones((10, 2)))


# --- Class accuracy ---


def test_class_accuracy_shuffled_is_chance_and_identical_is_one():
    requested = np.repeat(np.arange(10), 1000)
    predicted = np.random.default_rng(19).permutation(requested)
    assert class_accuracy(predicted, requested) == pytest.approx(0.1, abs=0.02)
    assert class_accuracy(requested, requested) == 1.0


def test_class_accuracy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="equal length"):
        class_accuracy(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="at least one"):
        class_accuracy(np.zeros(0), np.zeros(0))
