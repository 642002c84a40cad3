"""Geometric verification by RANSAC: a pair scores the inlier count of its best affine / homography model.

Two implementations of one estimator (sample minimal sets, fit, count correspondences whose transfer error
`||model(src) - dst||` is within `threshold` pixels, keep the model with most inliers, stop a pair once
`confidence` is reached: `N = log(1 - confidence) / log(1 - w^s)` iterations, `w` its best inlier ratio so far,
`s` the minimal sample size, at most `iterations`):

- `ransac_batched` (torch): many pairs at once. Correspondence sets are padded to a common `M` with a validity
  mask; minimal samples are drawn up front (fixed seed: deterministic), then solved and scored as batched
  tensor ops, a chunk of hypotheses at a time; after each chunk, pairs that reached their `N` leave the batch.
- `ransac_opencv`: OpenCV's `cv2.estimateAffine2D` / `cv2.findHomography` on one pair (its own fixed seed);
  `GeometricVerifier` runs the pairs in `torch.get_num_threads()` threads, as OpenCV's RANSAC is serial.
Either way the best model can then be refit by least squares on its inliers (`refine_models`).

`GeometricVerifier(backend="auto")` picks per model the faster one, as measured by
`benchmarks/ransac_throughput.py` on CPU: OpenCV for `affine` (its 3-point fits are cheap per pair, and
the batched path scores far more hypotheses per second only on a GPU), batched torch for `homography`
(OpenCV's per-iteration homography solve is the slow step); on a CUDA device, always batched.

Degenerate minimal samples (collinear points; for a homography, inconsistent orientations) are skipped; a pair
with no other sample (too few or only collinear correspondences) gets 0 inliers and an all-zero model, never
an error or NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from hetretrieval.errors import ConfigError

MINIMAL_SAMPLE_SIZE = {"affine": 3, "homography": 4}
BACKENDS = ("auto", "batched", "opencv")
# The faster backend on CPU per model (benchmarks/ransac_throughput.py); any CUDA device runs batched.
CPU_BACKEND = {"affine": "opencv", "homography": "batched"}
# Triangles of a 4-point sample whose orientations a valid homography preserves (all) or reverses (all).
_HOMOGRAPHY_TRIANGLES = ((0, 1, 2), (1, 2, 3), (0, 2, 3), (0, 1, 3))
# |sin| of a sample triangle's angle below which its points count as collinear.
_COLLINEAR_SINE = 1e-5
# Completes OpenCV's 2 x 3 affine maps to 3 x 3 (np.concatenate: a tenth of np.vstack's per-pair cost).
_AFFINE_LAST_ROW = np.array([[0.0, 0.0, 1.0]])
# Elements of one (pairs, hypotheses, correspondences) intermediate when scoring hypotheses: bounds memory.
_SCORING_CHUNK_ELEMENTS = 1 << 22
# Hypotheses per pair scored between two termination checks (the granularity of early stopping).
_HYPOTHESES_PER_CHECK = 64


def _check_config(model: str, threshold: float, iterations: int, confidence: float = 1.0) -> None:
    if model not in MINIMAL_SAMPLE_SIZE:
        raise ConfigError(f"unknown geometric model '{model}', expected one of {sorted(MINIMAL_SAMPLE_SIZE)}")
    if threshold <= 0 or iterations < 1:
        raise ConfigError(f"RANSAC needs threshold > 0 and iterations >= 1, got {threshold} and {iterations}")
    if not 0 < confidence <= 1:
        raise ConfigError(f"RANSAC needs 0 < confidence <= 1, got {confidence}")


def required_iterations(
    best_counts: torch.Tensor, counts: torch.Tensor, size: int, confidence: float, iterations: int
) -> torch.Tensor:
    """Iterations a pair needs, `(B,)` best inlier counts and `(B,)` correspondence counts -> `(B,)` int64.

    OpenCV's `RANSACUpdateNumIters`: `round(log(1 - confidence) / log(1 - w^size))` with `w` the inlier ratio,
    `iterations` when that is larger or undefined (`w = 0`), 0 when `w = 1`; `confidence = 1`: `iterations`.
    """
    if confidence >= 1:
        return torch.full_like(counts, iterations, dtype=torch.int64)
    ratio = best_counts.clamp_min(0).double() / counts.clamp_min(1).double()
    denominator = 1 - ratio.clamp(0, 1) ** size
    numerator = math.log(1 - confidence)
    log_denominator = denominator.clamp_min(torch.finfo(torch.float64).tiny).log()
    full = (log_denominator >= 0) | (-numerator >= iterations * -log_denominator)
    needed = torch.where(full, float(iterations), (numerator / log_denominator).round())
    return torch.where(denominator < torch.finfo(torch.float64).tiny, 0.0, needed).long()


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
    """RANSAC over `B` pairs: `inliers` `(B, M)` bool, `models` `(B, 3, 3)` float64 from src to dst pixels;
    `drawn` `(B,)` int64, the minimal samples each pair drew before it stopped (None when not counted)."""

    inliers: torch.Tensor
    models: torch.Tensor
    drawn: torch.Tensor | None = None

    @property
    def num_inliers(self) -> torch.Tensor:
        """`(B,)` int64: the verification score of each pair."""
        return self.inliers.sum(-1)


def _score(
    models: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, valid: torch.Tensor, threshold: float
) -> torch.Tensor:
    """`(B, H, 3, 3)` models, `(B, M, 2)` src / dst, `(B, M)` validity -> `(B, H, M)` inlier masks.

    Scored in float32, as OpenCV does.
    """
    error = transfer_error(models.float(), src.float().unsqueeze(1), dst.float().unsqueeze(1))
    return (error <= threshold**2) & valid.unsqueeze(1)


def _refine_affine(
    src: torch.Tensor, dst: torch.Tensor, pair: torch.Tensor, inliers: torch.Tensor, models: torch.Tensor,
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`refine_models` for affine maps on concatenated pairs, no padding: `(N, 2)` float64 src / dst pixels,
    `(N,)` pair index and inlier mask, `(B, 3, 3)` models -> `(N,)` inliers and `(B, 3, 3)` models.

    Least squares in closed form from per-pair sums over the inliers (one `index_add_`): with `s`, `d` the
    inliers centred on their centroids, the linear part `L` solves `C L^T = R` (`C = sum s s^T`,
    `R = sum s d^T`) and the translation maps the src centroid to the dst centroid. Pairs with fewer than 3
    inliers keep their model; collinear inliers give a singular `C`: a non-finite or worse refit, not kept.
    """
    num_pairs = len(models)
    x, y = src[inliers].unbind(-1)
    u, v = dst[inliers].unbind(-1)
    terms = torch.stack([torch.ones_like(x), x, y, u, v, x * x, x * y, y * y, x * u, x * v, y * u, y * v], -1)
    sums = src.new_zeros(num_pairs, terms.shape[1]).index_add_(0, pair[inliers], terms)
    count = sums[:, 0]
    centroid_src, centroid_dst = (sums[:, 1:5] / count.clamp_min(1).unsqueeze(-1)).split(2, dim=-1)
    weighted_src = count.view(-1, 1, 1) * centroid_src.unsqueeze(-1)  # (B, 2, 1)
    c = sums[:, [5, 6, 6, 7]].view(-1, 2, 2) - weighted_src * centroid_src.unsqueeze(-2)
    r = sums[:, 8:].view(-1, 2, 2) - weighted_src * centroid_dst.unsqueeze(-2)
    adjugate = torch.stack([c[:, 1, 1], -c[:, 0, 1], -c[:, 1, 0], c[:, 0, 0]], -1).view(-1, 2, 2)
    determinant = c[:, 0, 0] * c[:, 1, 1] - c[:, 0, 1] * c[:, 1, 0]
    linear = (adjugate @ r / determinant.view(-1, 1, 1)).mT  # determinant 0: non-finite
    refit = torch.zeros_like(models)
    refit[:, :2, :2] = linear
    refit[:, :2, 2] = centroid_dst - (linear @ centroid_src.unsqueeze(-1)).squeeze(-1)
    refit[:, 2, 2] = 1
    refit_inliers = transfer_error(refit.float()[pair], src.float().unsqueeze(1), dst.float().unsqueeze(1))
    refit_inliers = refit_inliers.squeeze(1) <= threshold**2
    refit_count = torch.bincount(pair[refit_inliers], minlength=num_pairs)
    better = (count >= 3) & refit.isfinite().flatten(-2).all(-1) & (refit_count >= count)
    return torch.where(better[pair], refit_inliers, inliers), torch.where(better.view(-1, 1, 1), refit, models)


def refine_models(
    src: torch.Tensor, dst: torch.Tensor, valid: torch.Tensor, result: RansacResult, model: str, threshold: float
) -> RansacResult:
    """Refit each pair's model by weighted least squares on its inliers; keep the refit if no fewer inliers.

    `(B, M, 2)` src / dst pixels, `(B, M)` validity; pairs without inliers keep their result. Affine maps:
    `_refine_affine` on the valid correspondences.
    """
    src, dst = src.to(torch.float64), dst.to(torch.float64)
    if model == "affine":
        inliers = torch.zeros_like(result.inliers)
        inliers[valid], models = _refine_affine(src[valid], dst[valid], valid.nonzero()[:, 0],
                                                result.inliers[valid], result.models, threshold)
        return RansacResult(inliers=inliers, models=models, drawn=result.drawn)
    found = result.inliers.any(-1)
    refit = torch.zeros_like(result.models)
    refit[found] = fit_homography(src[found], dst[found], result.inliers[found].to(torch.float64))
    refit_inliers = _score(refit.unsqueeze(1), src, dst, valid, threshold).squeeze(1)
    better = (
        found & refit.isfinite().flatten(-2).all(-1) & (refit_inliers.sum(-1) >= result.inliers.sum(-1))
    )
    return RansacResult(
        inliers=torch.where(better.unsqueeze(-1), refit_inliers, result.inliers),
        models=torch.where(better.view(-1, 1, 1), refit, result.models),
        drawn=result.drawn,
    )


def ransac_batched(
    src: torch.Tensor,
    dst: torch.Tensor,
    valid: torch.Tensor,
    model: str = "affine",
    threshold: float = 5.0,
    iterations: int = 1000,
    seed: int = 0,
    refine: bool = True,
    confidence: float = 1.0,
) -> RansacResult:
    """RANSAC on `B` padded correspondence sets `(B, M, 2)`, `(B, M, 2)` pixels and `(B, M)` bool validity.

    Each pair draws up to `iterations` minimal samples (3 points for `affine`, 4 for `homography`) among its
    valid correspondences, and stops once it has drawn `required_iterations` for its best model so far
    (checked every `_HYPOTHESES_PER_CHECK` samples; `confidence = 1`: all `iterations`); a correspondence is
    an inlier when its transfer error is at most `threshold` pixels. With `refine`, `refine_models`.
    """
    _check_config(model, threshold, iterations, confidence)
    fit = fit_affine if model == "affine" else fit_homography
    size = MINIMAL_SAMPLE_SIZE[model]
    num_pairs, num_points = valid.shape
    src, dst = src.to(torch.float64), dst.to(torch.float64)
    counts = valid.sum(-1)
    if num_points == 0:
        return RansacResult(valid.clone(), src.new_zeros(num_pairs, 3, 3), counts.new_zeros(num_pairs))

    generator = torch.Generator().manual_seed(seed)
    ranks = _sample_without_replacement(counts, iterations, size, generator).clamp_max(num_points - 1)
    valid_first = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)  # (B, M) valid positions first
    samples = valid_first.gather(1, ranks.flatten(1)).view(num_pairs, iterations, size, 1)

    best_models = src.new_zeros(num_pairs, 3, 3)
    best_counts = counts.new_full((num_pairs,), -1)
    active = torch.nonzero(counts >= size).squeeze(1)  # pairs still sampling
    drawn, drawn_by_pair = 0, counts.new_zeros(num_pairs)
    while len(active) and drawn < iterations:
        chunk = min(_HYPOTHESES_PER_CHECK, max(1, _SCORING_CHUNK_ELEMENTS // (len(active) * num_points)))
        index = samples[active, drawn : drawn + chunk].expand(-1, -1, -1, 2)
        pair_src, pair_dst = src[active], dst[active]
        sample_src = pair_src.unsqueeze(1).expand(-1, index.shape[1], -1, -1).gather(2, index)
        sample_dst = pair_dst.unsqueeze(1).expand(-1, index.shape[1], -1, -1).gather(2, index)
        models = fit(sample_src, sample_dst, torch.ones_like(sample_src[..., 0]))
        usable = _non_degenerate(sample_src, sample_dst, model) & models.isfinite().flatten(-2).all(-1)
        scores = _score(models, pair_src, pair_dst, valid[active], threshold).sum(-1)
        chunk_counts, chunk_best = torch.where(usable, scores, -1).max(dim=1)  # (A,)
        better = chunk_counts > best_counts[active]
        best_counts[active[better]] = chunk_counts[better]
        best_models[active[better]] = models[better, chunk_best[better]]
        drawn += index.shape[1]
        drawn_by_pair[active] = drawn
        needed = required_iterations(best_counts[active], counts[active], size, confidence, iterations)
        active = active[needed > drawn]

    found = best_counts >= 0  # some sample was non-degenerate
    best_models[~found] = 0
    inliers = _score(best_models.unsqueeze(1), src, dst, valid, threshold).squeeze(1) & found.unsqueeze(-1)
    result = RansacResult(inliers=inliers, models=best_models, drawn=drawn_by_pair)
    return refine_models(src, dst, valid, result, model, threshold) if refine else result


def ransac_opencv(
    src: np.ndarray,
    dst: np.ndarray,
    model: str = "affine",
    threshold: float = 5.0,
    iterations: int = 1000,
    confidence: float = 0.999,
) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's RANSAC on one pair: `(M, 2)` src / dst pixels -> inliers `(M,)` bool, model `(3, 3)` float64.

    Same transfer error and threshold as `ransac_batched`, early stopping at `confidence` (`< 1`), no refit
    (OpenCV's own refinement would move the model, not the inliers). Too few points or no model: 0 inliers
    and an all-zero model.
    """
    import cv2

    _check_config(model, threshold, iterations, confidence)
    if confidence >= 1:
        raise ConfigError(f"OpenCV RANSAC needs confidence < 1, got {confidence}")
    inliers, no_model = np.zeros(len(src), dtype=bool), np.zeros((3, 3))
    if len(src) < MINIMAL_SAMPLE_SIZE[model]:
        return inliers, no_model
    src, dst = np.ascontiguousarray(src, dtype=np.float32), np.ascontiguousarray(dst, dtype=np.float32)
    options = {"method": cv2.RANSAC, "ransacReprojThreshold": threshold, "maxIters": iterations,
               "confidence": confidence}
    if model == "affine":
        affine, mask = cv2.estimateAffine2D(src, dst, refineIters=0, **options)
        matrix = None if affine is None else np.concatenate([affine, _AFFINE_LAST_ROW])
    else:
        matrix, mask = cv2.findHomography(src, dst, **options)
    if matrix is None or mask is None:
        return inliers, no_model
    return mask.ravel().astype(bool), matrix.astype(np.float64)


def pad_correspondences(
    correspondences: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`B` pairs of `(M_b, 2)` src / dst pixels -> src, dst `(B, M, 2)` float32 0-padded, valid `(B, M)`."""
    lengths = np.array([len(src) for src, _ in correspondences], dtype=np.int64)
    valid = np.arange(lengths.max(initial=0)) < lengths[:, None]
    src, dst = (np.zeros((*valid.shape, 2), dtype=np.float32) for _ in range(2))
    if valid.any():
        src[valid] = np.concatenate([points for points, _ in correspondences])
        dst[valid] = np.concatenate([points for _, points in correspondences])
    return torch.from_numpy(src), torch.from_numpy(dst), torch.from_numpy(valid)


@dataclass(frozen=True)
class GeometricVerifier:
    """Configured RANSAC for many image pairs (a Hydra target); a pair's score is its inlier count.

    `backend`: `batched` (`ransac_batched` on `device`, `batch_size` pairs at a time, grouped by correspondence
    count so that little is padding), `opencv` (`ransac_opencv` per pair, its own fixed seed; then one refit
    of all pairs) or `auto` (`resolved_backend`). Both stop a pair at `confidence` and, with `refine`, refit
    its model on its inliers (`refine_models`).
    """

    model: str = "affine"
    threshold: float = 5.0
    iterations: int = 1000
    seed: int = 0
    refine: bool = True
    batch_size: int = 64
    device: str = "cpu"
    confidence: float = 0.999
    backend: str = "auto"

    def __post_init__(self) -> None:
        _check_config(self.model, self.threshold, self.iterations, self.confidence)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown RANSAC backend '{self.backend}', expected one of {list(BACKENDS)}")
        if self.resolved_backend == "opencv" and self.confidence >= 1:
            raise ConfigError("the opencv RANSAC backend needs confidence < 1 (use backend=batched for a "
                              "fixed iteration budget)")

    @property
    def resolved_backend(self) -> str:
        """`backend`, `auto` resolved: `batched` on a CUDA device or at confidence 1, else `CPU_BACKEND`."""
        if self.backend != "auto":
            return self.backend
        if torch.device(self.device).type != "cpu" or self.confidence >= 1:
            return "batched"
        return CPU_BACKEND[self.model]

    def _opencv(self, batch: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """`ransac_opencv` on every pair, in `torch.get_num_threads()` threads (OpenCV's RANSAC is serial and
        releases the GIL; each call seeds its own generator, so the results do not depend on the threads)."""
        def solve(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
            return [ransac_opencv(src, dst, self.model, self.threshold, self.iterations, self.confidence)
                    for src, dst in pairs]

        workers = min(torch.get_num_threads(), len(batch))
        if workers <= 1:
            return solve(batch)
        found: list = [None] * len(batch)
        with ThreadPoolExecutor(workers, thread_name_prefix="hetretrieval-ransac") as pool:
            # interleaved slices: the pairs come sorted by size, so each thread gets a like share of the work
            for start, part in enumerate(pool.map(solve, [batch[k::workers] for k in range(workers)])):
                found[start::workers] = part
        return found

    def _verify(self, batch: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """One batch of pairs -> their inlier masks."""
        if self.resolved_backend == "batched":
            src, dst, valid = (padded.to(self.device) for padded in pad_correspondences(batch))
            inliers = ransac_batched(src, dst, valid, self.model, self.threshold, self.iterations, self.seed,
                                     self.refine, self.confidence).inliers.cpu().numpy()
        else:
            found = self._opencv(batch)
            if not self.refine:
                return [mask for mask, _ in found]
            if self.model == "affine":  # refit the concatenated pairs, no padding
                lengths = [len(points_src) for points_src, _ in batch]
                src, dst = (torch.from_numpy(np.concatenate([pair[k] for pair in batch]).astype(np.float64))
                            for k in (0, 1))
                inliers, _ = _refine_affine(src, dst, torch.from_numpy(np.repeat(np.arange(len(batch)), lengths)),
                                            torch.from_numpy(np.concatenate([mask for mask, _ in found])),
                                            torch.from_numpy(np.stack([model for _, model in found])),
                                            self.threshold)
                return np.split(inliers.numpy(), np.cumsum(lengths)[:-1])
            src, dst, valid = pad_correspondences(batch)
            inliers = np.zeros(valid.shape, dtype=bool)
            inliers[valid.numpy()] = np.concatenate([mask for mask, _ in found])
            result = RansacResult(torch.from_numpy(inliers), torch.from_numpy(np.stack([m for _, m in found])))
            inliers = refine_models(src, dst, valid, result, self.model, self.threshold).inliers.numpy()
        return [inliers[row, : len(points_src)] for row, (points_src, _) in enumerate(batch)]

    def __call__(self, correspondences: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """Pairs of `(M_i, 2)` src / dst pixel arrays -> their `(M_i,)` bool inlier masks, in input order."""
        for points_src, points_dst in correspondences:
            if points_src.shape != points_dst.shape or points_src.shape[1:] != (2,):
                raise ValueError(
                    f"correspondences must be two (M, 2) arrays, got {points_src.shape}, {points_dst.shape}"
                )
        order = np.argsort([len(src) for src, _ in correspondences], kind="stable")
        masks: list[np.ndarray] = [np.zeros(0, dtype=bool)] * len(correspondences)
        batch_size = self.batch_size if self.resolved_backend == "batched" else max(1, len(order))
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            for i, mask in zip(batch, self._verify([correspondences[i] for i in batch]), strict=True):
                masks[i] = mask
        return masks
