"""RANSAC on synthetic correspondences (known affine map / homography plus outliers) and degenerate inputs.

Agreement with OpenCV on real ORB matches is in tests/integration/test_local_matching.py.
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from hetretrieval.errors import ConfigError
from hetretrieval.models.local.ransac import (
    GeometricVerifier,
    RansacResult,
    _sample_without_replacement,
    fit_affine,
    fit_homography,
    pad_correspondences,
    ransac_batched,
    refine_models,
    required_iterations,
    transfer_error,
)
from opencv_reference import ransac_opencv

THRESHOLD = 3.0
AFFINE = np.array([[0.9, -0.25, 40.0], [0.3, 1.1, -15.0], [0.0, 0.0, 1.0]])
HOMOGRAPHY = np.array([[0.8, 0.1, 30.0], [-0.05, 0.95, 12.0], [4e-4, -2e-4, 1.0]])


def project(model: np.ndarray, points: np.ndarray) -> np.ndarray:
    mapped = np.c_[points, np.ones(len(points))] @ model.T
    return mapped[:, :2] / mapped[:, 2:]


def synthetic_pair(model: np.ndarray, n: int, outlier_fraction: float, seed: int):
    """`n` correspondences in a 640 x 480 image: inliers with 0.5 px noise, outliers uniform in dst.

    Returns src, dst float32 and the truth: within THRESHOLD of the true model (an outlier may land there).
    """
    rng = np.random.default_rng(seed)
    src = rng.uniform([0, 0], [640, 480], (n, 2))
    dst = project(model, src) + rng.normal(0, 0.5, (n, 2))
    outliers = rng.random(n) < outlier_fraction
    dst[outliers] = rng.uniform([0, 0], [640, 480], (outliers.sum(), 2))
    truth = np.linalg.norm(project(model, src) - dst, axis=1) <= THRESHOLD
    return src.astype(np.float32), dst.astype(np.float32), truth


def run_batched(pairs, model, **kwargs):
    src, dst, valid = pad_correspondences(pairs)
    return ransac_batched(src, dst, valid, model=model, threshold=THRESHOLD, **kwargs)


@pytest.mark.parametrize(("model", "name"), [(AFFINE, "affine"), (HOMOGRAPHY, "homography")])
@pytest.mark.parametrize("refine", [False, True])
def test_batched_ransac_recovers_known_model(model, name, refine):
    pairs = [
        synthetic_pair(model, n, fraction, seed)
        for seed, (n, fraction) in enumerate([(200, 0.4), (60, 0.6), (400, 0.2)])
    ]
    result = run_batched([(src, dst) for src, dst, _ in pairs], name, iterations=500, refine=refine)
    assert result.inliers.shape == (3, 400) and result.models.shape == (3, 3, 3)
    for row, (src, _, truth) in enumerate(pairs):
        inliers = result.inliers[row, : len(src)].numpy()
        assert not result.inliers[row, len(src) :].any()  # padding is never an inlier
        if refine:  # least squares on >= 20 inliers with 0.5 px noise: the exact set, sub-pixel model
            np.testing.assert_array_equal(inliers, truth)
            mapped = project(result.models[row].numpy(), src[truth])
            assert np.abs(mapped - project(model, src[truth])).max() < 1.0
        else:  # a model from a noisy minimal sample may miss a few borderline inliers, never adds outliers
            assert not (inliers & ~truth).any() and inliers.sum() >= 0.9 * truth.sum()


@pytest.mark.parametrize(("model", "name"), [(AFFINE, "affine"), (HOMOGRAPHY, "homography")])
def test_batched_and_opencv_agree_on_synthetic_pairs(model, name):
    for seed in range(3):
        src, dst, truth = synthetic_pair(model, 150, 0.5, seed)
        batched = run_batched([(src, dst)], name, iterations=1000).num_inliers.item()
        reference, _ = ransac_opencv(src, dst, name, threshold=THRESHOLD, iterations=1000)
        assert abs(batched - reference.sum()) <= 2 and abs(batched - truth.sum()) <= 2


@pytest.mark.parametrize(("fit", "model", "size"), [(fit_affine, AFFINE, 3), (fit_homography, HOMOGRAPHY, 4)])
def test_fits_are_exact_on_minimal_sets_and_ignore_zero_weights(fit, model, size):
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 500, (10, 2))
    dst = project(model, src)
    dst[size:] += rng.uniform(20, 50, (10 - size, 2))  # corrupted, but weighted 0
    weights = torch.zeros(10, dtype=torch.float64)
    weights[:size] = 1
    fitted = fit(torch.from_numpy(src), torch.from_numpy(dst), weights).numpy()
    np.testing.assert_allclose(fitted / fitted[2, 2], model, rtol=1e-6, atol=1e-9)


def test_affine_refit_is_least_squares_on_the_inliers():
    """`refine_models` (affine) against numpy's lstsq on each pair's inliers; fewer than 3 keep their model.
    The opencv backend's refit of the concatenated pairs gives the same inliers as the padded one."""
    pairs = [synthetic_pair(AFFINE, n, 0.3, seed)[:2] for seed, n in enumerate([80, 150, 2, 40])]
    src, dst, valid = pad_correspondences(pairs)
    rough = ransac_batched(src, dst, valid, "affine", THRESHOLD, iterations=200, refine=False)
    refined = refine_models(src, dst, valid, rough, "affine", THRESHOLD)
    for row, (points_src, points_dst) in enumerate(pairs):
        inliers = rough.inliers[row, : len(points_src)].numpy()
        if inliers.sum() < 3:
            assert torch.equal(refined.models[row], rough.models[row])
            continue
        design = np.c_[points_src[inliers], np.ones(inliers.sum())].astype(np.float64)
        solution = np.linalg.lstsq(design, points_dst[inliers].astype(np.float64), rcond=None)[0]  # (3, 2)
        np.testing.assert_allclose(refined.models[row, :2].numpy(), solution.T, rtol=1e-7, atol=1e-7)
    found = [ransac_opencv(points_src, points_dst, "affine", THRESHOLD, 1000) for points_src, points_dst in pairs]
    masks = np.zeros(valid.shape, dtype=bool)
    masks[valid.numpy()] = np.concatenate([mask for mask, _ in found])
    opencv = RansacResult(torch.from_numpy(masks), torch.from_numpy(np.stack([model for _, model in found])))
    padded = refine_models(src, dst, valid, opencv, "affine", THRESHOLD).inliers
    verified = GeometricVerifier(threshold=THRESHOLD, backend="opencv")(pairs)
    for row, mask in enumerate(verified):
        np.testing.assert_array_equal(mask, padded[row, : len(mask)].numpy())


def test_transfer_error_hand_computed():
    shift = torch.tensor([[1.0, 0.0, 3.0], [0.0, 1.0, 4.0], [0.0, 0.0, 1.0]])
    src = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    dst = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(transfer_error(shift, src, dst), torch.tensor([0.0, 41.0]))
    assert transfer_error(torch.zeros(3, 3), src, dst).isinf().all()  # no model: never an inlier


def test_minimal_samples_are_distinct_and_uniform():
    counts = torch.tensor([5, 3, 7])
    ranks = _sample_without_replacement(counts, 3000, 3, torch.Generator().manual_seed(0))
    assert ((ranks >= 0) & (ranks < counts.view(3, 1, 1))).all()
    assert all(len(set(sample)) == 3 for sample in ranks.flatten(0, 1).tolist())
    subsets = Counter(tuple(sorted(sample)) for sample in ranks[0].tolist())
    assert set(subsets) == set(itertools.combinations(range(5), 3))
    assert max(subsets.values()) < 1.3 * 3000 / 10 and min(subsets.values()) > 0.7 * 3000 / 10


@pytest.mark.parametrize("name", ["affine", "homography"])
def test_degenerate_inputs_give_zero_inliers(name):
    line = np.stack([np.linspace(0, 400, 30), 0.3 * np.linspace(0, 400, 30) + 7], axis=1).astype(np.float32)
    same_point = np.full((30, 2), 42.0, dtype=np.float32)
    src, dst, _ = synthetic_pair(AFFINE, 50, 0.2, 0)
    pairs = [
        (src[:2], dst[:2]),  # fewer than a minimal set (3 is too few for a homography too)
        (src[:3], dst[:3]) if name == "homography" else (src[:0], dst[:0]),
        (line, line + 5),  # collinear
        (same_point, same_point),
        (src, dst),  # a normal pair in the same batch still verifies
    ]
    result = run_batched(pairs, name, iterations=200)
    assert result.num_inliers[:4].tolist() == [0, 0, 0, 0]
    assert result.num_inliers[4] > 30
    assert (result.models[:4] == 0).all() and result.models.isfinite().all()


def test_empty_batch_and_all_invalid_padding():
    result = ransac_batched(torch.zeros(2, 0, 2), torch.zeros(2, 0, 2), torch.zeros(2, 0, dtype=torch.bool))
    assert result.inliers.shape == (2, 0) and result.num_inliers.tolist() == [0, 0]
    src, dst, _ = synthetic_pair(AFFINE, 20, 0.0, 0)
    masked = ransac_batched(
        torch.from_numpy(src)[None], torch.from_numpy(dst)[None], torch.zeros(1, 20, dtype=torch.bool)
    )
    assert masked.num_inliers.tolist() == [0]


def test_fixed_seed_is_deterministic():
    src, dst, _ = synthetic_pair(HOMOGRAPHY, 100, 0.7, 3)
    first, second = (run_batched([(src, dst)], "homography", iterations=50, seed=7) for _ in range(2))
    torch.testing.assert_close(first.models, second.models)
    assert torch.equal(first.inliers, second.inliers)


def test_required_iterations_hand_computed():
    best, counts = torch.tensor([50, 0, 100, -1, 30]), torch.tensor([100, 100, 100, 0, 100])
    # w = 0.5: log(0.001) / log(1 - 0.125) = 51.7 -> 52; w = 0 or no model: all; w = 1: none;
    # w = 0.3: log(0.001) / log(1 - 0.027) = 252.4 -> 252
    assert required_iterations(best, counts, 3, 0.999, 1000).tolist() == [52, 1000, 0, 1000, 252]
    assert required_iterations(best, counts, 3, 0.999, 100).tolist() == [52, 100, 0, 100, 100]
    assert required_iterations(best, counts, 4, 1.0, 1000).tolist() == [1000] * 5


def test_each_pair_stops_once_its_confidence_is_reached():
    """An easy pair (90% inliers) leaves the batch at the first check; a hard one (3 inliers in 40) runs on."""
    easy = synthetic_pair(AFFINE, 200, 0.1, 0)
    rng = np.random.default_rng(1)
    hard_src = rng.uniform(0, 640, (40, 2)).astype(np.float32)
    hard = (hard_src, rng.uniform(0, 640, (40, 2)).astype(np.float32))
    pairs = [easy[:2], hard, easy[:2]]
    adaptive = run_batched(pairs, "affine", iterations=1000, confidence=0.999)
    exhaustive = run_batched(pairs, "affine", iterations=1000, confidence=1.0)
    assert adaptive.drawn.tolist() == [64, 1000, 64] and exhaustive.drawn.tolist() == [1000, 1000, 1000]
    for result in (adaptive, exhaustive):
        np.testing.assert_array_equal(result.inliers[0, :200].numpy(), easy[2])
    # the hard pair drew the same samples either way: the same best model
    assert torch.equal(adaptive.inliers[1], exhaustive.inliers[1])


def test_auto_backend_is_opencv_for_affine_on_cpu_else_batched():
    assert GeometricVerifier().resolved_backend == "opencv"
    assert GeometricVerifier(model="homography").resolved_backend == "batched"
    assert GeometricVerifier(device="cuda").resolved_backend == "batched"
    assert GeometricVerifier(confidence=1.0).resolved_backend == "batched"
    assert GeometricVerifier(model="homography", backend="opencv").resolved_backend == "opencv"
    with pytest.raises(ConfigError, match="confidence < 1"):
        GeometricVerifier(backend="opencv", confidence=1.0)
    with pytest.raises(ConfigError, match="backend"):
        GeometricVerifier(backend="magsac")
    with pytest.raises(ConfigError, match="confidence"):
        GeometricVerifier(confidence=0.0)


@pytest.mark.parametrize("backend", ["batched", "opencv"])
@pytest.mark.parametrize("refine", [False, True])
def test_geometric_verifier_keeps_input_order(backend, refine):
    pairs = [synthetic_pair(AFFINE, n, 0.3, seed)[:2] for seed, n in enumerate([80, 10, 2, 150, 40])]
    masks = GeometricVerifier(threshold=THRESHOLD, iterations=300, batch_size=2, backend=backend,
                              refine=refine)(pairs)
    assert [len(mask) for mask in masks] == [80, 10, 2, 150, 40]
    for (src, dst), mask in zip(pairs, masks, strict=True):
        expected = np.linalg.norm(project(AFFINE, src) - dst, axis=1) <= THRESHOLD
        np.testing.assert_array_equal(mask, expected if len(src) >= 3 else np.zeros(len(src), bool))


def test_opencv_backend_gives_the_same_inliers_in_any_number_of_threads():
    pairs = [synthetic_pair(AFFINE, n, 0.6, seed)[:2] for seed, n in enumerate([30, 80, 12, 150, 40, 60, 5])]
    verify = GeometricVerifier(threshold=THRESHOLD, backend="opencv")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = verify(pairs)
        torch.set_num_threads(3)
        threaded = verify(pairs)
    finally:
        torch.set_num_threads(threads)
    for one, three in zip(serial, threaded, strict=True):
        np.testing.assert_array_equal(one, three)


def test_bad_configuration_raises_config_error():
    with pytest.raises(ConfigError):
        GeometricVerifier(model="similarity")
    with pytest.raises(ConfigError):
        GeometricVerifier(threshold=0)
    with pytest.raises(ConfigError):
        ransac_opencv(np.zeros((5, 2)), np.zeros((5, 2)), iterations=0)
