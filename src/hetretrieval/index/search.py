"""Exact nearest-neighbour search with faiss, streamed in query batches.

Evaluation needs the full ranking of the database for every query (AP must see every positive), but a dense
`Q x N` similarity matrix does not fit in memory for large collections: `iter_rankings` yields the full ranking
of one query batch at a time, sized so that a batch holds about `max_batch_entries` similarities.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import faiss  # imported where used: faiss stays out of import time


@dataclass(frozen=True)
class RankingBatch:
    """Full rankings of a batch of queries: `positions (b, N)` into the database, `scores (b, N)` descending."""

    start: int
    positions: np.ndarray
    scores: np.ndarray


def build_flat_index(database: np.ndarray) -> faiss.Index:
    """An exact inner-product index over L2-normalised database descriptors `(N, D)`."""
    import faiss

    index = faiss.IndexFlatIP(database.shape[1])
    index.add(np.ascontiguousarray(database, dtype=np.float32))
    return index


def iter_rankings(
    queries: np.ndarray, database: np.ndarray, exclude: np.ndarray | None = None,
    max_batch_entries: int = 1 << 24,
) -> Iterator[RankingBatch]:
    """Yield the full database ranking of each query batch: `(Q, D), (N, D) -> b x (N,)` per batch.

    `exclude[q]` is a database position to drop from query q's ranking (the query itself), or -1. It is moved
    to the end of the ranking with score -inf, so every row keeps length N and AP/P@k are unaffected.
    Ties keep faiss's order (lower database position first); tie-aware metrics do not depend on it.
    """
    n_database = database.shape[0]
    index = build_flat_index(database)
    batch = max(1, max_batch_entries // max(n_database, 1))
    for start in range(0, queries.shape[0], batch):
        block = np.ascontiguousarray(queries[start : start + batch], dtype=np.float32)
        scores, positions = index.search(block, n_database)
        if exclude is not None:
            dropped = positions == exclude[start : start + batch, None]
            order = np.argsort(dropped, axis=1, kind="stable")
            positions = np.take_along_axis(positions, order, axis=1)
            scores = np.where(np.take_along_axis(dropped, order, axis=1), -np.inf,
                              np.take_along_axis(scores, order, axis=1))
        yield RankingBatch(start, positions, scores)
