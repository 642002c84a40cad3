"""Geometric verification by RANSAC: a pair scores the inlier count of its best affine / homography model.

Two implementations of one estimator (sample minimal sets, fit, count correspondences whose transfer error
`||model(src) - dst||` is within `threshold` pixels, keep the model with most inliers):

- `ransac_batched` (torch): many pairs at once. Correspondence sets are padded to a common `M` with a validity
  mask; all `B x iterations` minimal samples are drawn, solved and scored as batched tensor ops; the best
  model can be refit by least squares on its inliers. Fixed iteration count, fixed seed: deterministic.
The tests and `benchmarks/ransac_throughput.py` compare it with OpenCV's `cv2.estimateAffine2D` /
`cv2.findHomography` (`tests/opencv_reference.py`).

Degenerate minimal samples (collinear points; for a homography, inconsistent orientations) are skipped; a pair
with no other sample (too few or only collinear correspondences) gets 0 inliers and an all-zero model, never
an error or NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hetretrieval.errors import ConfigError

MINIMAL_SAMPLE_SIZE = {"affine": 3, "homography": 4}
# Triangles of a 4-point sample whose orientations a valid homography preserves (all) or reverses (all).
_HOMOGRAPHY_TRIANGLES = ((0, 1, 2), (1, 2, 3), (0, 2, 3), (0, 1, 3))
# |sin| of a sample triangle's angle below which its points count as collinear.
_COLLINEAR_SINE = 1e-5
# Elements of one (pairs, hypotheses, correspondences) intermediate when scoring hypotheses: bounds memory.
_SCORING_CHUNK_ELEMENTS = 1 << 22


def _check_config(model: str, threshold: float, iterations: int) -> None:
    if model not in MINIMAL_SAMPLE_SIZE:
        raise ConfigError(f"unknown geometric model '{model}', expected one of {sorted(MINIMAL_SAMPLE_SIZE)}")
    if threshold <= 0 or iterations < 1:
        raise ConfigError(f"RANSAC needs threshold > 0 and iterations >= 1, got {threshold} and {iterations}")


def _normalise(
    points: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hartley normalisation: `(..., K, 2)`, `(..., K)` -> normalised points, `T` and `T^-1` `(..., 3, 3)`.

    `T` moves the weighted centroid to the origin and scales the mean distance to it to `sqrt(2)`.
    """
    finfo = torch.finfo(points.dtype)
    total = weights.sum(-1).clamp_min(finfo.tiny)
    centroid = (weights.unsqueeze(-1) * points).sum(-2) / total.unsqueeze(-1)
    centred = points - centroid.unsqueeze(-2)
    spread = (weights * centred.norm(dim=-1)).sum(-1) / total
    scale = math.sqrt(2) / spread.clamp_min(finfo.eps)  # coincident points stay finite
    transform = torch.zeros(*points.shape[:-2], 3, 3, dtype=points.dtype, device=points.device)
    inverse = torch.zeros_like(transform)
    transform[..., 0, 0] = transform[..., 1, 1] = scale
    transform[..., :2, 2] = -scale.unsqueeze(-1) * centroid
    inverse[..., 0, 0] = inverse[..., 1, 1] = 1 / scale
    inverse[..., :2, 2] = centroid
    transform[..., 2, 2] = inverse[..., 2, 2] = 1
    return centred * scale.unsqueeze(-1).unsqueeze(-1), transform, inverse


def fit_affine(src: torch.Tensor, dst: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted least-squares affine map `src -> dst`: `(..., K, 2)` twice, `(..., K)` -> `(..., 3, 3)`.

    Exact for 3 non-collinear points; without 3 weighted points in general position, entries are non-finite.
    """
    src_n, src_t, _ = _normalise(src, weights)
    dst_n, _, dst_inv = _normalise(dst, weights)
    design = torch.cat([src_n, torch.ones_like(src_n[..., :1])], dim=-1)  # (..., K, 3)
    weighted = design * weights.unsqueeze(-1)
    solution, _ = torch.linalg.solve_ex(weighted.mT @ design, weighted.mT @ dst_n)  # (..., 3, 2)
    affine = torch.zeros_like(src_t)
    affine[..., :2, :] = solution.mT
    affine[..., 2, 2] = 1
    return dst_inv @ affine @ src_t


def fit_homography(src: torch.Tensor, dst: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted normalised DLT homography `src -> dst`: `(..., K, 2)` twice, `(..., K)` -> `(..., 3, 3)`.

    Exact for 4 points, no 3 collinear. Minimises the algebraic error with `h33 = 1` in Hartley-normalised
    coordinates (safe there: `h33 = 0` would send the src centroid to infinity), i.e. solves 8 x 8 normal
    equations, which batch far faster than an SVD. Degenerate inputs give non-finite entries.
    """
    src_n, src_t, _ = _normalise(src, weights)
    dst_n, _, dst_inv = _normalise(dst, weights)
    x, y = src_n.unbind(-1)
    u, v = dst_n.unbind(-1)
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows = torch.cat(  # (..., 2K, 8): h11..h32 coefficients of [u; v]
        [
            torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], dim=-1),
            torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], dim=-1),
        ],
        dim=-2,
    )
    weighted = rows * torch.cat([weights, weights], dim=-1).unsqueeze(-1)
    solution, _ = torch.linalg.solve_ex(
        weighted.mT @ rows, weighted.mT @ torch.cat([u, v], dim=-1).unsqueeze(-1)
    )
    homography = torch.cat([solution.squeeze(-1), torch.ones_like(solution[..., :1, 0])], dim=-1).unflatten(
        -1, (3, 3)
    )
    homography = dst_inv @ homography @ src_t
    return homography / torch.linalg.matrix_norm(homography).unsqueeze(-1).unsqueeze(-1)


def transfer_error(models: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Squared transfer error `||model(src) - dst||^2`: `(..., 3, 3)`, `(..., M, 2)` twice -> `(..., M)`.

    Leading dimensions of `models` and `src` broadcast; `dst` has the shape of `src`. Points mapped to
    infinity give `inf` (never inliers).
    """
    x, y = src[..., 0], src[..., 1]
    h = models.flatten(-2).unsqueeze(-1).unbind(-2)  # 9 x (..., 1)
    # fused multiply-adds and in-place updates: scoring hypotheses is memory-bound
    u, v, w = (torch.addcmul(h[i + 2], h[i], x).addcmul_(h[i + 1], y) for i in (0, 3, 6))
    error = u.div_(w).sub_(dst[..., 0]).square_().add_(v.div_(w).sub_(dst[..., 1]).square_())
    return error.nan_to_num_(nan=math.inf)


def _non_degenerate(src: torch.Tensor, dst: torch.Tensor, model: str) -> torch.Tensor:
    """Minimal samples `(..., K, 2)` twice -> `(...,)` bool: no collinear triple, consistent orientations."""
    triangles = _HOMOGRAPHY_TRIANGLES if model == "homography" else ((0, 1, 2),)

    def signed_sines(points: torch.Tensor) -> torch.Tensor:
        first, second, third = (points[..., list(corner), :] for corner in zip(*triangles, strict=True))
        edge_a, edge_b = second - first, third - first
        cross = edge_a[..., 0] * edge_b[..., 1] - edge_a[..., 1] * edge_b[..., 0]
        return cross / (edge_a.norm(dim=-1) * edge_b.norm(dim=-1)).clamp_min(torch.finfo(points.dtype).tiny)

    sines_src, sines_dst = signed_sines(src), signed_sines(dst)
    general = (sines_src.abs() > _COLLINEAR_SINE).all(-1) & (sines_dst.abs() > _COLLINEAR_SINE).all(-1)
    if model == "affine":
        return general
    same_orientation = (sines_src * sines_dst > 0).sum(-1)
    return general & ((same_orientation == 0) | (same_orientation == len(triangles)))


def _sample_without_replacement(
    counts: torch.Tensor, iterations: int, size: int, generator: torch.Generator
) -> torch.Tensor:
    """`(B,)` set sizes -> `(B, iterations, size)` int64 distinct ranks in `[0, count)`, uniform over subsets.

    The k-th draw is uniform over the `count - k` unused ranks: drawn in `[0, count - k)`, then shifted past
    each used rank it reaches (in increasing order). Rows with `count < size` hold meaningless ranks.
    """
    uniform = torch.rand(len(counts), iterations, size, generator=generator, dtype=torch.float64)
    uniform = uniform.to(counts.device)  # drawn by a CPU generator: the same samples on every device
    ranks = torch.zeros(len(counts), iterations, 0, dtype=torch.int64, device=counts.device)
    for k in range(size):
        remaining = (counts - k).clamp_min(1).unsqueeze(-1)
        rank = (uniform[..., k] * remaining).long().clamp_max(remaining - 1)
        for used in ranks.sort(dim=-1).values.unbind(-1):
            rank = rank + (rank >= used).long()
        ranks = torch.cat([ranks, rank.unsqueeze(-1)], dim=-1)
    return ranks


@dataclass(frozen=True)
class RansacResult:
    """RANSAC over `B` pairs: `inliers` `(B, M)` bool, `models` `(B, 3, 3)` float64 from src to dst pixels."""

    inliers: torch.Tensor
    models: torch.Tensor

    @property
    def num_inliers(self) -> torch.Tensor:
        """`(B,)` int64: the verification score of each pair."""
        return self.inliers.sum(-1)


def ransac_batched(
    src: torch.Tensor,
    dst: torch.Tensor,
    valid: torch.Tensor,
    model: str = "affine",
    threshold: float = 5.0,
    iterations: int = 1000,
    seed: int = 0,
    refine: bool = True,
) -> RansacResult:
    """RANSAC on `B` padded correspondence sets `(B, M, 2)`, `(B, M, 2)` pixels and `(B, M)` bool validity.

    Each pair draws `iterations` minimal samples (3 points for `affine`, 4 for `homography`) among its valid
    correspondences; a correspondence is an inlier when its transfer error is at most `threshold` pixels. With
    `refine`, the best model is refit on its inliers (weighted least squares), kept if no fewer inliers.
    """
    _check_config(model, threshold, iterations)
    fit = fit_affine if model == "affine" else fit_homography
    size = MINIMAL_SAMPLE_SIZE[model]
    num_pairs, num_points = valid.shape
    src, dst = src.to(torch.float64), dst.to(torch.float64)
    src_32, dst_32 = src.float().unsqueeze(1), dst.float().unsqueeze(1)
    squared_threshold = threshold**2
    counts = valid.sum(-1)
    if num_points == 0:
        return RansacResult(inliers=valid.clone(), models=src.new_zeros(num_pairs, 3, 3))

    def score(models: torch.Tensor) -> torch.Tensor:
        """`(B, H, 3, 3)` -> `(B, H, M)` inlier masks (scored in float32, as OpenCV does)."""
        return (transfer_error(models.float(), src_32, dst_32) <= squared_threshold) & valid.unsqueeze(1)

    generator = torch.Generator().manual_seed(seed)
    ranks = _sample_without_replacement(counts, iterations, size, generator).clamp_max(num_points - 1)
    valid_first = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)  # (B, M) valid positions first
    samples = (
        valid_first.gather(1, ranks.flatten(1)).view(num_pairs, iterations, size, 1).expand(-1, -1, -1, 2)
    )

    best_models = src.new_zeros(num_pairs, 3, 3)
    best_counts = counts.new_full((num_pairs,), -1)
    chunk = max(1, _SCORING_CHUNK_ELEMENTS // max(1, num_pairs * num_points))
    for start in range(0, iterations, chunk):
        index = samples[:, start : start + chunk]
        sample_src = src.unsqueeze(1).expand(-1, index.shape[1], -1, -1).gather(2, index)
        sample_dst = dst.unsqueeze(1).expand(-1, index.shape[1], -1, -1).gather(2, index)
        models = fit(sample_src, sample_dst, torch.ones_like(sample_src[..., 0]))
        usable = (
            _non_degenerate(sample_src, sample_dst, model)
            & models.isfinite().flatten(-2).all(-1)
            & (counts >= size).unsqueeze(-1)
        )
        hypothesis_counts = torch.where(usable, score(models).sum(-1), -1)  # (B, H)
        chunk_counts, chunk_best = hypothesis_counts.max(dim=1)
        better = torch.nonzero(chunk_counts > best_counts).squeeze(1)
        best_counts[better] = chunk_counts[better]
        best_models[better] = models[better, chunk_best[better]]

    found = best_counts >= 0  # some sample was non-degenerate
    best_models[~found] = 0
    inliers = score(best_models.unsqueeze(1)).squeeze(1) & found.unsqueeze(-1)
    if refine:
        refit = torch.zeros_like(best_models)
        refit[found] = fit(src[found], dst[found], inliers[found].to(torch.float64))
        refit_inliers = score(refit.unsqueeze(1)).squeeze(1)
        better = found & refit.isfinite().flatten(-2).all(-1) & (refit_inliers.sum(-1) >= inliers.sum(-1))
        best_models[better] = refit[better]
        inliers = torch.where(better.unsqueeze(-1), refit_inliers, inliers)
    return RansacResult(inliers=inliers, models=best_models)


def pad_correspondences(
    correspondences: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`B` pairs of `(M_b, 2)` src / dst pixels -> src, dst `(B, M, 2)` float32 0-padded, valid `(B, M)`."""
    num_points = max((len(src) for src, _ in correspondences), default=0)
    src = torch.zeros(len(correspondences), num_points, 2)
    dst = torch.zeros_like(src)
    valid = torch.zeros(len(correspondences), num_points, dtype=torch.bool)
    for b, (points_src, points_dst) in enumerate(correspondences):
        src[b, : len(points_src)] = torch.as_tensor(points_src, dtype=torch.float32)
        dst[b, : len(points_dst)] = torch.as_tensor(points_dst, dtype=torch.float32)
        valid[b, : len(points_src)] = True
    return src, dst, valid


@dataclass(frozen=True)
class GeometricVerifier:
    """Configured batched RANSAC for many image pairs (a Hydra target); a pair's score is its inlier count.

    Pairs are verified `batch_size` at a time on `device`, grouped by correspondence count so that little is
    padding.
    """

    model: str = "affine"
    threshold: float = 5.0
    iterations: int = 1000
    seed: int = 0
    refine: bool = True
    batch_size: int = 64
    device: str = "cpu"

    def __post_init__(self) -> None:
        _check_config(self.model, self.threshold, self.iterations)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")

    def __call__(self, correspondences: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """Pairs of `(M_i, 2)` src / dst pixel arrays -> their `(M_i,)` bool inlier masks, in input order."""
        for points_src, points_dst in correspondences:
            if points_src.shape != points_dst.shape or points_src.shape[1:] != (2,):
                raise ValueError(
                    f"correspondences must be two (M, 2) arrays, got {points_src.shape}, {points_dst.shape}"
                )
        order = np.argsort([len(src) for src, _ in correspondences], kind="stable")
        masks: list[np.ndarray] = [np.zeros(0, dtype=bool)] * len(correspondences)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            src, dst, valid = (
                padded.to(self.device) for padded in pad_correspondences([correspondences[i] for i in batch])
            )
            result = ransac_batched(
                src, dst, valid, self.model, self.threshold, self.iterations, self.seed, self.refine
            )
            inliers = result.inliers.cpu().numpy()
            for row, i in enumerate(batch):
                masks[i] = inliers[row, : len(correspondences[i][0])]
        return masks
