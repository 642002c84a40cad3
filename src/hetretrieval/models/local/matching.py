"""Tentative correspondences between two images' local descriptors: mutual nearest neighbours, ratio test.

Float descriptors are L2-normalised and compared by cosine similarity, expressed as the Euclidean distance
`sqrt(2 - 2 cos)` (same ranking, and the distance Lowe's ratio is defined on); packed binary descriptors (ORB)
are compared by Hamming distance, computed exactly as `|a| + |b| - 2 a.b` on the unpacked bits (one matmul).
"""

from __future__ import annotations

import numpy as np
import torch

from hetretrieval.errors import ConfigError
from hetretrieval.models.local.features import LocalFeatures


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """`(N, D)` uint8 packed bits -> `(N, 8 * D)` float32 in {0, 1} (bit order is irrelevant here)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).flatten(-2).float()


def hamming_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise Hamming distances, `(N, D)`, `(M, D)` uint8 packed -> `(N, M)` float32 (exact integers)."""
    bits_a, bits_b = unpack_bits(a), unpack_bits(b)
    return bits_a.sum(1, keepdim=True) + bits_b.sum(1) - 2 * bits_a @ bits_b.T


def descriptor_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise distances `(N, D)`, `(M, D)` -> `(N, M)`: Hamming for packed uint8, else `sqrt(2 - 2 cos)`."""
    if a.dtype != b.dtype or a.shape[1] != b.shape[1]:
        raise ValueError(f"descriptors differ: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
    if a.dtype == torch.uint8:
        return hamming_distance(a, b)
    return (2 - 2 * a @ b.T).clamp_min(0).sqrt()


def match_descriptors(
    a: torch.Tensor, b: torch.Tensor, mutual: bool = True, ratio: float | None = None
) -> torch.Tensor:
    """Tentative matches `(N, D)`, `(M, D)` -> `(K, 2)` int64 index pairs `(i in a, j in b)`, sorted by `i`.

    Each descriptor of `a` proposes its nearest neighbour in `b` (lowest index on ties). `mutual` keeps a
    pair only if `i` is also the nearest neighbour of `j` in `a`; `ratio` keeps it only if `d1 < ratio * d2`
    (Lowe), with `d2 = inf` when `b` has one descriptor. Filters combine; with neither, all proposals stay.
    """
    if ratio is not None and not 0 < ratio <= 1:
        raise ConfigError(f"the ratio test needs 0 < ratio <= 1, got {ratio}")
    if len(a) == 0 or len(b) == 0:
        return torch.zeros((0, 2), dtype=torch.int64, device=a.device)
    distance = descriptor_distance(a, b)
    nearest_distance, nearest_in_b = distance.min(dim=1)
    keep = torch.ones(len(a), dtype=torch.bool, device=a.device)
    if mutual:
        keep &= distance.argmin(dim=0)[nearest_in_b] == torch.arange(len(a), device=a.device)
    if ratio is not None and len(b) > 1:
        second_distance = distance.topk(2, dim=1, largest=False).values[:, 1]
        keep &= nearest_distance < ratio * second_distance
    query = torch.nonzero(keep).squeeze(1)
    return torch.stack([query, nearest_in_b[query]], dim=1)


def match_features(
    a: LocalFeatures, b: LocalFeatures, mutual: bool = True, ratio: float | None = None
) -> np.ndarray:
    """`match_descriptors` on two images' features -> `(K, 2)` int64 numpy index pairs into keypoints."""
    matches = match_descriptors(
        torch.from_numpy(a.descriptors), torch.from_numpy(b.descriptors), mutual=mutual, ratio=ratio
    )
    return matches.numpy()
