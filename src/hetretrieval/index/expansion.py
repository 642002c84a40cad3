"""Query expansion and database-side augmentation: pure functions over L2-normalised descriptors.

αQE (Radenović et al., TPAMI 2018) replaces each query `q` by `l2n(q + sum_i w_i d_i)` over its top-`k`
database neighbours `d_i` (by inner product), `w_i = max(q . d_i, 0) ** alpha`; DBA replaces each database
descriptor the same way by its top-`k` *other* database descriptors. `alpha = 0` gives average QE (every
weight 1); negative similarities weigh 0 before the power. Under the paper's protocol a query never expands
with itself: `exclude[q]`, the query's own database position (or -1), is never one of its neighbours, just as
`iter_rankings` drops it from the ranking. `k` larger than the database uses every available neighbour.

`expand_for_search` is the scoring step: DBA on the database first, then αQE of the queries against the
augmented database; the caller searches the returned descriptors. Neighbours come from an exact faiss
inner-product search of `min(k + 1, N)` entries, so memory stays `O(n * k)` for any database size.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from hetretrieval.index.search import build_flat_index


class Expansion(Protocol):
    """What αQE / DBA need: `hetretrieval.config.ExpansionOptions` has it."""

    k: int
    alpha: float


def top_neighbours(vectors: np.ndarray, database: np.ndarray, k: int,
                   exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each vector's top-`k` database neighbours by inner product, `exclude[i]` (a database position, or -1)
    left out: `(n, D), (N, D) -> positions (n, k'), similarities (n, k')`, `k' = min(k, N)`, descending.

    Where fewer than `k'` neighbours remain (`k >= N` with an excluded entry), the missing last column holds
    position -1 with similarity -inf.
    """
    n_database = database.shape[0]
    width = min(k, n_database)
    if width == 0 or vectors.shape[0] == 0:
        return np.zeros((vectors.shape[0], 0), np.int64), np.zeros((vectors.shape[0], 0), np.float32)
    index = build_flat_index(database)
    scores, positions = index.search(np.ascontiguousarray(vectors, dtype=np.float32), min(k + 1, n_database))
    if exclude is not None:
        dropped = positions == np.asarray(exclude)[:, None]
        order = np.argsort(dropped, axis=1, kind="stable")  # the excluded entry (if found) moves to the end
        positions = np.take_along_axis(positions, order, axis=1)
        scores = np.take_along_axis(scores, order, axis=1)
        dropped = np.take_along_axis(dropped, order, axis=1)
        positions, scores = np.where(dropped, -1, positions), np.where(dropped, -np.inf, scores)
    return positions[:, :width].astype(np.int64), scores[:, :width].astype(np.float32)


def expand(vectors: np.ndarray, database: np.ndarray, k: int, alpha: float,
           exclude: np.ndarray | None = None) -> np.ndarray:
    """`l2n(v + sum_i max(v . d_i, 0) ** alpha * d_i)` over the top-`k` database neighbours `d_i` of each
    vector `v` (`exclude` as in `top_neighbours`): `(n, D), (N, D) -> (n, D)` float32."""
    positions, similarities = top_neighbours(vectors, database, k, exclude)
    expanded = np.array(vectors, dtype=np.float64, copy=True)
    database = np.asarray(database, dtype=np.float64)
    for column in range(positions.shape[1]):
        found = positions[:, column] >= 0
        weights = np.where(found, np.power(np.clip(similarities[:, column], 0.0, None), alpha), 0.0)
        expanded += weights[:, None] * database[np.where(found, positions[:, column], 0)]
    norms = np.linalg.norm(expanded, axis=1, keepdims=True)
    return (expanded / np.maximum(norms, 1e-12)).astype(np.float32)


def query_expansion(queries: np.ndarray, database: np.ndarray, k: int, alpha: float,
                    exclude: np.ndarray | None = None) -> np.ndarray:
    """αQE: each query expanded by its top-`k` database neighbours, never its own entry `exclude[q]`."""
    return expand(queries, database, k, alpha, exclude)


def database_augmentation(database: np.ndarray, k: int, alpha: float) -> np.ndarray:
    """DBA: each database descriptor expanded by its top-`k` other database descriptors."""
    return expand(database, database, k, alpha, np.arange(database.shape[0]))


def expand_for_search(queries: np.ndarray, database: np.ndarray, exclude: np.ndarray | None,
                      query_expansion_options: Expansion | None,
                      dba_options: Expansion | None) -> tuple[np.ndarray, np.ndarray]:
    """The descriptors to search: DBA of the database (if set), then αQE of the queries against it (if set)."""
    if dba_options is not None:
        database = database_augmentation(database, dba_options.k, dba_options.alpha)
    if query_expansion_options is not None:
        queries = query_expansion(queries, database, query_expansion_options.k, query_expansion_options.alpha,
                                  exclude)
    return queries, database
