"""Retrieval with local features: a product-quantised descriptor index, votes, spatial verification.

The paper's local pipeline (DELF, ORB): every database local descriptor goes into one faiss index, compressed
by product quantisation (float descriptors; the memory-saving choice of Noh et al.) or kept as packed bits
(binary ORB descriptors, exact Hamming search). A query's descriptors each vote for the database images of
their nearest neighbours; the `shortlist` most-voted images are verified geometrically (tentative matches,
then RANSAC) and ranked by inlier count, the paper's image score. Packed descriptors take their tentative
matches from the vote search itself (the mutual matches among the votes: heritage-wild ORB mAP 0.249 vs 0.178
matching every pair, in half the time; `benchmarks/orb_search.py`). The same verification re-ranks the
top of any global ranking (`rerank_rankings`). Both produce `RankingBatch`es for the one evaluator,
`hetretrieval.metrics.retrieval.evaluate_rankings`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from hetretrieval.errors import ConfigError
from hetretrieval.index.search import RankingBatch
from hetretrieval.models.local.features import LocalFeatures
from hetretrieval.models.local.matching import match_features_to_many, mutual_binary
from hetretrieval.models.local.ransac import GeometricVerifier
from hetretrieval.models.whitening import apply_whitening, fit_pca

if TYPE_CHECKING:
    import faiss  # imported where used: faiss stays out of import time


@dataclass
class LocalSearchOptions:
    """How local features are indexed, matched and verified (the `local_search` config section)."""

    shortlist: int = 100  # most-voted database images verified per query
    neighbours: int = 10  # nearest database descriptors retrieved per query descriptor (its votes)
    pq_subquantizers: int = 8  # PQ sub-vectors (code bytes with 8-bit codes); must divide the dimension
    ivf_lists: int = 0  # > 0: IndexIVFPQ with that many inverted lists (large collections); 0: IndexPQ
    ivf_probes: int = 8  # inverted lists visited per query descriptor (IVF only)
    mutual: bool = True  # tentative matches must be mutual nearest neighbours
    ratio: float | None = None  # Lowe's ratio test on top of (or instead of) mutual matching; matches each pair
    vote_matches: bool = True  # packed descriptors: tentative matches among the votes (false: match each pair)
    seed: int = 0  # PQ / IVF k-means seed

    def __post_init__(self) -> None:
        if self.shortlist < 1 or self.neighbours < 1 or self.pq_subquantizers < 1 or self.ivf_probes < 1:
            raise ConfigError("local_search needs shortlist, neighbours, pq_subquantizers and ivf_probes >= 1")
        if self.ivf_lists < 0:
            raise ConfigError(f"local_search.ivf_lists must be >= 0, got {self.ivf_lists}")


def stack_descriptors(features: Sequence[LocalFeatures]) -> tuple[np.ndarray, np.ndarray]:
    """Per-image features -> all descriptors `(M, D)` and the image each comes from, `owner (M,)` int64."""
    if not features:
        raise ValueError("no local features to stack")
    descriptors = np.concatenate([f.descriptors for f in features])
    owner = np.repeat(np.arange(len(features)), [len(f) for f in features])
    return descriptors, owner


def build_descriptor_index(descriptors: np.ndarray, options: LocalSearchOptions) -> faiss.Index | faiss.IndexBinary:
    """Index `(M, D)` descriptors: exact Hamming for packed uint8, PQ (or IVF-PQ) on inner product for float.

    PQ codebooks have `2^bits` centroids: 256 (8-bit codes) once there are the 39 training descriptors per
    centroid faiss asks for, fewer for small collections.
    """
    import faiss

    count, dim = descriptors.shape
    if descriptors.dtype == np.uint8:
        index = faiss.IndexBinaryFlat(8 * dim)
        index.add(np.ascontiguousarray(descriptors))
        return index
    if dim % options.pq_subquantizers:
        raise ConfigError(f"local_search.pq_subquantizers={options.pq_subquantizers} must divide the "
                          f"descriptor dimension {dim}")
    if count < 2:
        raise ConfigError(f"a PQ index needs at least 2 database descriptors, got {count}")
    bits = min(8, max(1, int(np.log2(count / 39))))
    data = np.ascontiguousarray(descriptors, dtype=np.float32)
    if options.ivf_lists:
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, options.ivf_lists, options.pq_subquantizers, bits,
                                 faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = options.seed
        index.nprobe = options.ivf_probes
    else:
        index = faiss.IndexPQ(dim, options.pq_subquantizers, bits, faiss.METRIC_INNER_PRODUCT)
    index.pq.cp.seed = options.seed
    index.train(data)
    index.add(data)
    return index


def index_memory(index: faiss.Index | faiss.IndexBinary, descriptors: np.ndarray) -> dict:
    """Memory of the descriptor index vs. the raw descriptors it replaces (bytes, as serialised by faiss)."""
    import faiss

    binary = isinstance(index, faiss.IndexBinary)
    serialised = faiss.serialize_index_binary(index) if binary else faiss.serialize_index(index)
    flat_bytes = descriptors.shape[0] * descriptors.shape[1] * (1 if binary else 4)
    return {
        "index": type(index).__name__,
        "descriptors": int(descriptors.shape[0]),
        "dim": int(descriptors.shape[1]) * (8 if binary else 1),
        "code_bytes": int(index.code_size),
        "index_bytes": int(serialised.size),
        "flat_bytes": int(flat_bytes),
        "compression": round(flat_bytes / max(int(serialised.size), 1), 2),
    }


def vote_neighbours(index: faiss.Index | faiss.IndexBinary, owner: np.ndarray, queries: np.ndarray, neighbours: int,
                    n_images: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The votes of `(q, D)` query descriptors, one per (query descriptor, image) among its `neighbours` nearest
    database descriptors: `(V,)` query descriptor, image, and that image's nearest listed descriptor (a row of
    `index`), sorted by query descriptor then image."""
    empty = np.zeros(0, dtype=np.int64)
    if len(queries) == 0 or index.ntotal == 0:
        return empty, empty, empty
    k = min(neighbours, index.ntotal)
    data = np.ascontiguousarray(queries if queries.dtype == np.uint8 else queries.astype(np.float32))
    _, found = index.search(data, k)
    listed = found >= 0
    rows = np.broadcast_to(np.arange(len(found))[:, None], found.shape)[listed]
    found = found[listed]  # row by row, nearest first: an image's first occurrence is its nearest descriptor
    voted, first = np.unique(rows * n_images + owner[found], return_index=True)
    return voted // n_images, voted % n_images, found[first]


def vote_correspondences(
    query: LocalFeatures, descriptors: np.ndarray, keypoints: np.ndarray,
    votes: tuple[np.ndarray, np.ndarray, np.ndarray], shortlist: np.ndarray, n_images: int, mutual: bool = True,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Tentative matches of `query` to each `shortlist` image from its packed-descriptor `votes`
    (`vote_neighbours` into the stacked database `descriptors` and `keypoints`): `(src, dst)` pixels per image.

    A query descriptor is matched to the nearest descriptor of each image it voted for, kept, if `mutual`, when
    it is that descriptor's nearest in the query: `match_binary`'s matches whose query descriptor voted for
    the image. Found in the one vote search, with no search per pair.
    """
    rows, images, nearest = votes
    position = np.full(n_images, -1)
    position[shortlist] = np.arange(len(shortlist))
    keep = position[images] >= 0
    if mutual:
        keep[keep] = mutual_binary(query.descriptors, descriptors, rows[keep], nearest[keep])
    order = np.flatnonzero(keep)[np.argsort(position[images[keep]], kind="stable")]  # by image, then row
    bounds = np.searchsorted(position[images[order]], np.arange(len(shortlist) + 1))
    src, dst = query.keypoints[rows[order]], keypoints[nearest[order]]
    return [(src[start:end], dst[start:end]) for start, end in itertools.pairwise(bounds)]


def inlier_counts(correspondences: Sequence[tuple[np.ndarray, np.ndarray]], verifier: GeometricVerifier) -> np.ndarray:
    """`(P,)` int64 inlier counts of the `(src, dst)` correspondences of `P` pairs (`verifier`, all at once)."""
    if not correspondences:
        return np.zeros(0, dtype=np.int64)
    return np.array([mask.sum() for mask in verifier(correspondences)], dtype=np.int64)


def verify_pairs(
    pairs: Sequence[tuple[LocalFeatures, LocalFeatures]], verifier: GeometricVerifier, mutual: bool = True,
    ratio: float | None = None,
) -> np.ndarray:
    """Inlier counts `(P,)` of image pairs: tentative matches, then RANSAC (`inlier_counts`).

    Consecutive pairs sharing their first image (a query and its shortlist) are matched in one call.
    """
    correspondences = []
    for _, group in itertools.groupby(pairs, key=lambda pair: id(pair[0])):
        group = list(group)
        a, others = group[0][0], [b for _, b in group]
        for b, matches in zip(others, match_features_to_many(a, others, mutual, ratio), strict=True):
            correspondences.append((a.keypoints[matches[:, 0]], b.keypoints[matches[:, 1]]))
    return inlier_counts(correspondences, verifier)


def local_rankings(
    queries: Sequence[LocalFeatures], database: Sequence[LocalFeatures], exclude: np.ndarray,
    verifier: GeometricVerifier, options: LocalSearchOptions,
    index: faiss.Index | faiss.IndexBinary | None = None,
) -> Iterator[RankingBatch]:
    """Full database ranking of each query (one `RankingBatch` per query) by votes then spatial verification.

    The `shortlist` most-voted images (excluding `exclude[q]`, the query itself, or -1) score their inlier
    count plus `votes / (max_votes + 1)` (votes only break ties); every other image scores
    `votes / (max_votes + 1) - 1`, below any verified one; the excluded image comes last with -inf.
    With `vote_matches`, packed descriptors without a ratio test are verified on the matches among their votes
    (`vote_correspondences`); otherwise each pair is matched (`verify_pairs`).
    """
    descriptors, owner = stack_descriptors(database)
    index = build_descriptor_index(descriptors, options) if index is None else index
    from_votes = options.vote_matches and descriptors.dtype == np.uint8 and options.ratio is None
    keypoints = np.concatenate([f.keypoints for f in database]) if from_votes else None
    for q, query in enumerate(queries):
        votes = vote_neighbours(index, owner, query.descriptors, options.neighbours, len(database))
        counts = np.bincount(votes[1], minlength=len(database))
        scores = counts / (counts.max() + 1.0) - 1.0
        if exclude[q] >= 0:
            scores[exclude[q]] = -np.inf
        shortlist = np.argsort(-scores, kind="stable")[: min(options.shortlist, len(database))]
        shortlist = shortlist[np.isfinite(scores[shortlist])]
        if from_votes:
            inliers = inlier_counts(vote_correspondences(query, descriptors, keypoints, votes, shortlist,
                                                         len(database), options.mutual), verifier)
        else:
            inliers = verify_pairs([(query, database[i]) for i in shortlist], verifier, options.mutual,
                                   options.ratio)
        scores[shortlist] += 1.0 + inliers
        order = np.argsort(-scores, kind="stable")
        yield RankingBatch(q, order[None], scores[order][None])


def rerank_rankings(
    rankings: Iterable[RankingBatch], queries: Sequence[LocalFeatures], database: Sequence[LocalFeatures],
    verifier: GeometricVerifier, top_k: int, mutual: bool = True, ratio: float | None = None,
) -> Iterator[RankingBatch]:
    """Re-rank the first `top_k` entries of each ranking by inlier count (ties keep their order); rest unchanged.

    `queries` and `database` are aligned with the rankings' query rows and database positions. Re-ranked
    entries score `top + inliers + (1 - r / top_k) / 2`, `r` their previous rank and `top` one more than the
    largest score below them, so scores stay descending over the whole ranking.
    """
    if top_k < 1:
        raise ConfigError(f"rerank.top_k must be >= 1, got {top_k}")
    for batch in rankings:
        positions, scores = batch.positions.copy(), batch.scores.astype(np.float64)
        for row in range(positions.shape[0]):
            head = np.flatnonzero(np.isfinite(scores[row, :top_k]))
            query = queries[batch.start + row]
            inliers = verify_pairs([(query, database[p]) for p in positions[row, head]], verifier, mutual, ratio)
            order = np.lexsort((head, -inliers))  # by inliers, then previous rank
            rest = scores[row, head.size:][np.isfinite(scores[row, head.size:])]
            top = (rest.max() if rest.size else 0.0) + 1.0
            positions[row, head] = positions[row, head[order]]
            scores[row, head] = top + inliers[order] + (1 - head[order] / top_k) / 2
        yield RankingBatch(batch.start, positions, scores)


def reduce_dimension(
    features: Sequence[LocalFeatures], fit_on: Sequence[LocalFeatures], dim: int, max_samples: int = 100_000,
    seed: int = 0,
) -> list[LocalFeatures]:
    """PCA of float descriptors learned on `fit_on` (e.g. the database; at most `max_samples`, seeded), applied
    to `features`, then L2-normalised (DELF's PCA to 40 dimensions)."""
    sample, _ = stack_descriptors(fit_on)
    if len(sample) > max_samples:
        sample = sample[np.random.default_rng(seed).choice(len(sample), max_samples, replace=False)]
    mean, components = fit_pca(torch.from_numpy(sample).double(), dim)
    return [
        LocalFeatures(f.keypoints, apply_whitening(torch.from_numpy(f.descriptors).double(), mean, components)
                      .float().numpy(), f.scores, f.image_size)
        for f in features
    ]
