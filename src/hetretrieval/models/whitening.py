"""Descriptor whitening: fitted off-line, applied as the final linear layer + L2 normalisation.

Two fits, both returning ``(mean (D,), projection (d, D))`` so that the whitened descriptor is
``normalize(projection @ (x - mean))``:

- :func:`fit_pca_whitening`, unsupervised (Jégou & Chum 2012): decorrelate and equalise the variances of the
  descriptors, optionally shrinking the covariance towards a multiple of the identity;
- :func:`fit_learned_whitening`, Lw of Radenović et al. (2016) from matching pairs: whiten the differences of
  matching descriptors (which removes the variability that matches share), then rotate to the principal axes
  of the whitened descriptors, so that truncating to ``d`` dimensions keeps the most varying ones.

Fits run in float64 and return tensors in the dtype of the descriptors. Eigenvector signs are fixed (largest
entry positive) so that a fit is reproducible across platforms.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hetretrieval.errors import ConfigError

# Eigenvalues below this fraction of the largest one count as zero when measuring the rank of the data.
_RANK_TOLERANCE = 1e-10


def fit_pca(descriptors: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Principal axes (no whitening) of ``descriptors (N, D)`` -> ``mean (D,)``, ``components (dim, D)``.

    Orthonormal components by decreasing variance, signed as ``_sorted_eigh`` does so the projection is
    reproducible; apply them with :func:`apply_whitening` (project, then L2-normalise, as DELF does).
    """
    n, d = descriptors.shape
    if not 1 <= dim <= d or n < 2:
        raise ConfigError(f"PCA to dim={dim} needs 1 <= dim <= {d} and at least 2 descriptors, got {n}")
    x = descriptors.double()
    mean = x.mean(dim=0)
    centred = x - mean
    _, eigenvectors = _sorted_eigh(centred.T @ centred / (n - 1))
    return mean.to(descriptors.dtype), eigenvectors[:, :dim].T.to(descriptors.dtype)


def fit_pca_whitening(
    descriptors: Tensor, dim: int | None = None, shrinkage: float = 0.0
) -> tuple[Tensor, Tensor]:
    """PCA-whitening of ``descriptors (N, D)`` -> ``mean (D,)``, ``projection (dim, D)``; ``dim`` defaults to D.

    The covariance ``C`` is first shrunk to ``(1 - shrinkage) C + shrinkage * (tr(C) / D) I``: ``0`` whitens
    fully (whitened data has identity covariance), ``1`` only rotates and scales uniformly; values in between
    damp the amplification of low-variance (noisy) directions. ``dim`` may not exceed the rank of the centred
    data.
    """
    _check_shrinkage(shrinkage)
    x = descriptors.double()
    mean = x.mean(dim=0)
    centred = x - mean
    covariance = centred.T @ centred / len(x)
    eigenvalues, eigenvectors = _sorted_eigh(covariance)
    dim = _check_dim(dim, len(mean), _rank(eigenvalues), "the centred descriptors")
    if shrinkage > 0:
        eigenvalues = (1 - shrinkage) * eigenvalues + shrinkage * eigenvalues.mean()
    projection = eigenvectors[:, :dim].T / eigenvalues[:dim, None].sqrt()
    return mean.to(descriptors.dtype), projection.to(descriptors.dtype)


def fit_pca_whitening_in_span(descriptors: Tensor, dim: int | None = None,
                              shrinkage: float = 0.0) -> tuple[Tensor, Tensor]:
    """`fit_pca_whitening` for `N` descriptors of a large dimension `D` (e.g. VLAD, `D > N`): `(N, D)` ->
    `mean (D,)`, `projection (d, D)`, `d = min(dim, rank)`.

    The centred data spans at most `N - 1` directions: PCA-whitening is fitted on the coordinates in an
    orthonormal basis of that span (from a thin SVD) and composed with it, never forming the `D x D` covariance.
    """
    x = descriptors.double()
    mean = x.mean(0)
    _, singular_values, basis = torch.linalg.svd(x - mean, full_matrices=False)
    rank = int((singular_values > singular_values[0] * 1e-5).sum()) if len(singular_values) else 0
    if rank == 0:
        raise ConfigError(f"PCA-whitening needs descriptors that vary, got {len(x)} identical ones")
    basis = basis[:rank]
    _, projection = fit_pca_whitening((x - mean) @ basis.T, min(dim or rank, rank), shrinkage)
    return mean.to(descriptors.dtype), (projection @ basis).to(descriptors.dtype)


def fit_learned_whitening(
    descriptors: Tensor, pairs: Tensor, dim: int | None = None, shrinkage: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Learned whitening Lw from matching pairs -> ``mean (D,)``, ``projection (dim, D)``.

    ``descriptors (N, D)``; ``pairs (M, 2)`` indices of matching descriptors. The mean is that of the paired
    descriptors (both sides; cirtorch takes the query side). The whitening ``S^{-1/2}`` (inverse Cholesky
    factor) makes the covariance ``S`` of the pair differences the identity; its rows are then rotated to the
    principal axes of the whitened, centred descriptors and the first ``dim`` kept, so projected pair
    differences have identity covariance at any ``dim``. Needs pair differences spanning all D dimensions,
    unless ``shrinkage`` in (0, 1] shrinks their covariance towards ``tr(S) / D * I`` as for PCA (the way out
    when a collection has fewer matching pairs than descriptor dimensions).
    """
    _check_shrinkage(shrinkage)
    x = descriptors.double()
    first, second = x[pairs[:, 0]], x[pairs[:, 1]]
    mean = torch.cat([first, second]).mean(dim=0)
    differences = first - second
    difference_covariance = differences.T @ differences / len(differences)
    difference_rank = _rank(torch.linalg.eigvalsh(difference_covariance))
    if shrinkage > 0:
        identity_part = difference_covariance.trace() / x.shape[1] * torch.eye(x.shape[1], dtype=x.dtype)
        difference_covariance = (1 - shrinkage) * difference_covariance + shrinkage * identity_part
    elif difference_rank < x.shape[1]:
        raise ConfigError(
            f"learned whitening needs pair differences spanning all {x.shape[1]} descriptor dimensions; "
            f"{len(pairs)} pairs span {difference_rank}: use more pairs, shrinkage > 0 or PCA-whitening"
        )
    cholesky = torch.linalg.cholesky(difference_covariance)
    identity = torch.eye(x.shape[1], dtype=x.dtype)
    whitening = torch.linalg.solve_triangular(cholesky, identity, upper=False)  # L^{-1}: L^{-1} S L^{-T} = I
    whitened = (x - mean) @ whitening.T
    eigenvalues, rotation = _sorted_eigh(whitened.T @ whitened / len(x))
    dim = _check_dim(dim, x.shape[1], _rank(eigenvalues), "the whitened, centred descriptors")
    projection = rotation[:, :dim].T @ whitening
    return mean.to(descriptors.dtype), projection.to(descriptors.dtype)


def apply_whitening(descriptors: Tensor, mean: Tensor, projection: Tensor) -> Tensor:
    """``(B, D)`` -> ``(B, d)``: ``normalize(projection @ (x - mean))`` for each descriptor ``x``."""
    return F.normalize(F.linear(descriptors - mean, projection), dim=-1)


class Whitening(nn.Module):
    """A fitted whitening as the network's last layer, ``(B, D) -> (B, d)``, L2-normalised.

    ``mean`` and ``projection`` are buffers: saved with the checkpoint, not trained.
    """

    def __init__(self, mean: Tensor, projection: Tensor):
        super().__init__()
        if projection.ndim != 2 or mean.shape != projection.shape[1:]:
            raise ValueError(f"mean (D,) and projection (d, D) expected, got {tuple(mean.shape)}, "
                             f"{tuple(projection.shape)}")
        self.register_buffer("mean", mean)
        self.register_buffer("projection", projection)

    @property
    def in_features(self) -> int:
        return self.projection.shape[1]

    @property
    def out_features(self) -> int:
        return self.projection.shape[0]

    def forward(self, descriptors: Tensor) -> Tensor:
        return apply_whitening(descriptors, self.mean, self.projection)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _sorted_eigh(symmetric: Tensor) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition ``(D, D)`` -> eigenvalues ``(D,)`` descending, eigenvectors as columns ``(D, D)``.

    Each eigenvector's sign is chosen so that its largest-magnitude entry is positive.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(symmetric)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    largest = eigenvectors.abs().argmax(dim=0)
    signs = eigenvectors.gather(0, largest[None]).sign()
    return eigenvalues, eigenvectors * signs


def _rank(eigenvalues: Tensor) -> int:
    """Numerical rank of a positive semi-definite matrix from its eigenvalues."""
    return int((eigenvalues > _RANK_TOLERANCE * eigenvalues.max().clamp_min(0)).sum())


def _check_shrinkage(shrinkage: float) -> None:
    if not 0.0 <= shrinkage <= 1.0:
        raise ConfigError(f"whitening shrinkage must lie in [0, 1], got {shrinkage}")


def _check_dim(dim: int | None, n_features: int, rank: int, what: str) -> int:
    """``dim`` defaulted to the number of features, checked against the rank the data supports."""
    dim = n_features if dim is None else dim
    if not 1 <= dim <= rank:
        raise ConfigError(f"whitening dim must lie in [1, {rank}] (rank of {what}), got {dim}")
    return dim
