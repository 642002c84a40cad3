"""Tentative correspondences between two images' local descriptors: mutual nearest neighbours, ratio test.

Float descriptors are L2-normalised and compared by cosine similarity, expressed as the Euclidean distance
`sqrt(2 - 2 cos)` (same ranking, and the distance Lowe's ratio is defined on). Packed binary descriptors (ORB)
stay packed: their Hamming distances are XOR + popcount on the bytes (faiss), and their nearest neighbours come
from exact faiss binary k-NN searches, which order neighbours by (distance, index): the lowest index wins ties,
as `argmin` does on the float path. `benchmarks/orb_search.py --queries 3` (heritage-wild, 512 px, ORB 1000,
one thread): 6.4 ms per pair vs 41.5 ms by unpacking the bits to floats for one GEMM (6.5x), identical matches.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from hetretrieval.errors import ConfigError
from hetretrieval.models.local.features import LocalFeatures


def _check_ratio(ratio: float | None) -> None:
    if ratio is not None and not 0 < ratio <= 1:
        raise ConfigError(f"the ratio test needs 0 < ratio <= 1, got {ratio}")


def hamming_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise Hamming distances, `(N, D)`, `(M, D)` uint8 packed -> `(N, M)` int32 (XOR + popcount)."""
    import faiss

    a_bytes, b_bytes = (np.ascontiguousarray(x.cpu().numpy()) for x in (a, b))
    distance = np.zeros((len(a_bytes), len(b_bytes)), dtype=np.int32)
    if distance.size:
        faiss.hammings(faiss.swig_ptr(a_bytes), faiss.swig_ptr(b_bytes), len(a_bytes), len(b_bytes),
                       a_bytes.shape[1], faiss.swig_ptr(distance))
    return torch.from_numpy(distance).to(a.device)


def descriptor_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise distances `(N, D)`, `(M, D)` -> `(N, M)` float32: Hamming for packed uint8, else `sqrt(2 - 2 cos)`."""
    if a.dtype != b.dtype or a.shape[1] != b.shape[1]:
        raise ValueError(f"descriptors differ: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
    if a.dtype == torch.uint8:
        return hamming_distance(a, b).float()
    return (2 - 2 * a @ b.T).clamp_min(0).sqrt()


def _binary_nearest(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN of packed `(Q, D)` queries in `(M, D)` database: `(Q, k)` int32 distances and int64 indices,
    ordered by (distance, index).

    Runs on one OpenMP thread: these searches are small and many, and on a busy 2-core host faiss's thread
    synchronisation made 5 queries' matching take 9-79 s on 2 threads vs 1.7-2.2 s on one (measured).
    """
    import faiss

    index = faiss.IndexBinaryFlat(8 * database.shape[1])
    index.add(np.ascontiguousarray(database))
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return index.search(np.ascontiguousarray(queries), k)
    finally:
        faiss.omp_set_num_threads(threads)


def mutual_binary(a: np.ndarray, database: np.ndarray, rows: np.ndarray, nearest: np.ndarray) -> np.ndarray:
    """Which proposals are mutual: descriptor `rows[k]` of packed `a` `(N, D)` proposed `database[nearest[k]]`
    (`(K,)` each) -> `(K,)` bool, true when `rows[k]` is also that descriptor's nearest neighbour in `a` (lowest
    index on ties). One faiss search in `a` of every distinct proposed descriptor."""
    if len(rows) == 0:
        return np.zeros(0, dtype=bool)
    proposed, inverse = np.unique(nearest, return_inverse=True)
    _, back = _binary_nearest(a, database[proposed], 1)
    return back[inverse, 0] == rows


def match_binary(
    a: np.ndarray, others: Sequence[np.ndarray], mutual: bool = True, ratio: float | None = None
) -> list[np.ndarray]:
    """Tentative matches of packed `(N, D)` uint8 `a` to each of `others` `(M_b, D)`: `(K_b, 2)` int64 pairs each.

    Same rule as `match_descriptors` (nearest neighbour, lowest index on ties; `mutual`; `ratio` compared in
    float32 like the float path). The reverse searches of all `others` are one `mutual_binary` call.
    """
    _check_ratio(ratio)
    if a.dtype != np.uint8 or any(b.dtype != np.uint8 or b.shape[1:] != a.shape[1:] for b in others):
        raise ValueError(f"packed descriptors differ: {a.shape} {a.dtype} vs {[(b.shape, b.dtype) for b in others]}")
    proposals = []  # per image of others: the kept rows of a and their nearest descriptor there
    for b in others:
        if len(a) == 0 or len(b) == 0:
            proposals.append(np.zeros((0, 2), dtype=np.int64))
            continue
        distance, nearest = _binary_nearest(b, a, 2 if ratio is not None and len(b) > 1 else 1)
        keep = np.ones(len(a), dtype=bool)
        if distance.shape[1] == 2:
            keep &= distance[:, 0].astype(np.float32) < np.float32(ratio) * distance[:, 1].astype(np.float32)
        query = np.flatnonzero(keep)
        proposals.append(np.stack([query, nearest[query, 0]], axis=1).astype(np.int64))
    if not mutual or not others:
        return proposals
    offsets = np.cumsum([0] + [len(b) for b in others[:-1]])
    stacked = np.concatenate(proposals)
    kept = mutual_binary(a, np.concatenate(others), stacked[:, 0],
                         stacked[:, 1] + np.repeat(offsets, [len(p) for p in proposals]))
    return [pairs[keep] for pairs, keep in
            zip(proposals, np.split(kept, np.cumsum([len(p) for p in proposals])[:-1]), strict=True)]


def match_descriptors(
    a: torch.Tensor, b: torch.Tensor, mutual: bool = True, ratio: float | None = None
) -> torch.Tensor:
    """Tentative matches `(N, D)`, `(M, D)` -> `(K, 2)` int64 index pairs `(i in a, j in b)`, sorted by `i`.

    Each descriptor of `a` proposes its nearest neighbour in `b` (lowest index on ties). `mutual` keeps a
    pair only if `i` is also the nearest neighbour of `j` in `a`; `ratio` keeps it only if `d1 < ratio * d2`
    (Lowe), with `d2 = inf` when `b` has one descriptor. Filters combine; with neither, all proposals stay.
    Packed uint8 descriptors go through `match_binary`.
    """
    _check_ratio(ratio)
    if a.dtype != b.dtype or a.shape[1] != b.shape[1]:
        raise ValueError(f"descriptors differ: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
    if len(a) == 0 or len(b) == 0:
        return torch.zeros((0, 2), dtype=torch.int64, device=a.device)
    if a.dtype == torch.uint8:
        (matches,) = match_binary(a.cpu().numpy(), [b.cpu().numpy()], mutual, ratio)
        return torch.from_numpy(matches).to(a.device)
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


def match_features_to_many(
    a: LocalFeatures, others: Sequence[LocalFeatures], mutual: bool = True, ratio: float | None = None
) -> list[np.ndarray]:
    """`match_features(a, b)` for every `b` of `others` (binary descriptors: one `match_binary` call)."""
    if a.is_binary:
        return match_binary(a.descriptors, [b.descriptors for b in others], mutual, ratio)
    return [match_features(a, b, mutual, ratio) for b in others]


def match_features(
    a: LocalFeatures, b: LocalFeatures, mutual: bool = True, ratio: float | None = None
) -> np.ndarray:
    """`match_descriptors` on two images' features -> `(K, 2)` int64 numpy index pairs into keypoints."""
    matches = match_descriptors(
        torch.from_numpy(a.descriptors), torch.from_numpy(b.descriptors), mutual=mutual, ratio=ratio
    )
    return matches.numpy()
