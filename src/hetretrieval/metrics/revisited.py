"""The revisited Oxford/Paris evaluation protocols (Radenović et al., CVPR 2018): Easy, Medium and Hard.

Each query labels database images `easy`, `hard` or `junk`. A protocol says which of them are positives and
which are junk; junk images are removed from the ranking before positions are counted:

| protocol | positives   | junk         |
|----------|-------------|--------------|
| easy     | easy        | junk + hard  |
| medium   | easy + hard | junk         |
| hard     | hard        | junk + easy  |

Average precision is the official trapezoidal area under the precision-recall curve, precision@k the
official one (`k` is capped at the rank of the last retrieved positive), and queries without any positive
are excluded from the means. Rankings are `(n_queries, n_ranked)` arrays of database indices, best first:
the transpose of the official code's `(n_db, n_queries)`; `n_ranked` may be less than the database size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from hetretrieval.errors import ConfigError

PROTOCOLS = ("easy", "medium", "hard")
DEFAULT_KS = (1, 5, 10)


class RevisitedLabels(Protocol):
    """Database indices labelled for one query (e.g. `hetretrieval.data.revisitop.RevisitopQuery`)."""

    easy: np.ndarray
    hard: np.ndarray
    junk: np.ndarray


@dataclass(frozen=True)
class ProtocolScores:
    """Scores of one protocol. Per-query arrays hold NaN for queries without positives (excluded)."""

    mean_average_precision: float
    mean_precision_at_k: dict[int, float]
    average_precision: np.ndarray  # (n_queries,)
    precision_at_k: np.ndarray  # (n_queries, len(ks))


def label_masks(queries: Sequence[RevisitedLabels], n_db: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boolean `(n_queries, n_db)` masks of the easy, hard and junk images of every query."""
    masks = np.zeros((3, len(queries), n_db), dtype=bool)
    for q, query in enumerate(queries):
        for m, indices in enumerate((query.easy, query.hard, query.junk)):
            masks[m, q, np.asarray(indices, dtype=np.int64)] = True
    return masks[0], masks[1], masks[2]


def protocol_masks(
    easy: np.ndarray, hard: np.ndarray, junk: np.ndarray, protocol: str
) -> tuple[np.ndarray, np.ndarray]:
    """`(positive, junk)` masks of `protocol` from the easy/hard/junk masks, all `(n_queries, n_db)`."""
    if protocol == "easy":
        return easy, junk | hard
    if protocol == "medium":
        return easy | hard, junk
    if protocol == "hard":
        return hard, junk | easy
    raise ConfigError(f"unknown revisited protocol '{protocol}'; expected one of {PROTOCOLS}")


def positive_ranks(ranking: np.ndarray, positive: np.ndarray, junk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the retrieved positives fall once junk is removed from each ranked list.

    `ranking (Q, R)` database indices; `positive`, `junk (Q, N)` masks -> `(query, rank)`, both `(P,)` over the
    P retrieved positives, sorted by query then rank: the query of each and its 0-based position among that
    query's non-junk items.
    """
    is_junk = np.take_along_axis(junk, ranking, axis=1)
    junk_before = np.cumsum(is_junk, axis=1, dtype=np.int32) - is_junk
    query, position = np.nonzero(np.take_along_axis(positive, ranking, axis=1))
    return query, position - junk_before[query, position]


def trapezoidal_average_precision(query: np.ndarray, rank: np.ndarray, n_positives: np.ndarray) -> np.ndarray:
    """Area under the precision-recall curve by trapezoids, one recall step `1 / n_positives` per positive.

    `query`, `rank (P,)` from `positive_ranks`, `n_positives (Q,)` (> 0) -> `(Q,)`. The j-th positive
    (0-based) at rank r adds `(j / r + (j + 1) / (r + 1)) / 2` times the recall step, `j / r` read as 1 at r = 0.
    Positives missing from a truncated ranking add nothing.
    """
    n_queries = len(n_positives)
    found = np.bincount(query, minlength=n_queries)
    found_before = np.arange(len(query)) - (np.cumsum(found) - found)[query]
    precision_before = np.divide(found_before, rank, out=np.ones(len(rank)), where=rank > 0)
    precision_at = (found_before + 1) / (rank + 1)
    return np.bincount(query, weights=(precision_before + precision_at) / 2, minlength=n_queries) / n_positives


def capped_precision_at_k(query: np.ndarray, rank: np.ndarray, n_queries: int, ks: Sequence[int]) -> np.ndarray:
    """Official revisited precision@k: positives within the top `min(k, last positive rank)` over that cap.

    `query`, `rank (P,)` from `positive_ranks` -> `(n_queries, len(ks))`; 0 where no positive was retrieved.
    """
    position = rank + 1
    last = np.zeros(n_queries, dtype=position.dtype)
    np.maximum.at(last, query, position)
    caps = np.minimum(last[:, None], np.asarray(ks)[None, :])
    hits = np.stack(
        [np.bincount(query, weights=position <= cap[query], minlength=n_queries) for cap in caps.T], axis=1
    )
    return np.divide(hits, caps, out=np.zeros(caps.shape), where=caps > 0)


def protocol_scores(
    ranking: np.ndarray, positive: np.ndarray, junk: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> ProtocolScores:
    """mAP, mean precision@k and per-query scores for `ranking (Q, R)` and `positive`, `junk (Q, N)` masks."""
    n_queries = len(ranking)
    n_positives = positive.sum(axis=1)
    evaluated = n_positives > 0
    query, rank = positive_ranks(ranking, positive, junk)
    with np.errstate(invalid="ignore", divide="ignore"):  # queries without positives: NaN, excluded below
        average_precision = trapezoidal_average_precision(query, rank, n_positives)
    average_precision[~evaluated] = np.nan
    precision_at_k = capped_precision_at_k(query, rank, n_queries, ks)
    precision_at_k[~evaluated] = np.nan
    any_evaluated = evaluated.any()
    mean_precision = precision_at_k[evaluated].mean(axis=0) if any_evaluated else np.full(len(ks), np.nan)
    return ProtocolScores(
        mean_average_precision=float(average_precision[evaluated].mean()) if any_evaluated else float("nan"),
        mean_precision_at_k={int(k): float(p) for k, p in zip(ks, mean_precision, strict=True)},
        average_precision=average_precision,
        precision_at_k=precision_at_k,
    )


def evaluate_revisited(
    ranking: np.ndarray, queries: Sequence[RevisitedLabels], ks: Sequence[int] = DEFAULT_KS
) -> dict[str, ProtocolScores]:
    """Scores of the Easy, Medium and Hard protocols for `ranking (n_queries, n_ranked)`, best first."""
    ranking = _check_ranking(ranking, len(queries))
    if not ks or any(k < 1 for k in ks):
        raise ConfigError(f"precision@k needs one or more k >= 1, got {tuple(ks)}")
    largest_label = max((int(a.max()) for q in queries for a in (q.easy, q.hard, q.junk) if len(a)), default=-1)
    n_db = max(int(ranking.max(initial=-1)), largest_label) + 1
    easy, hard, junk = label_masks(queries, n_db)
    return {
        protocol: protocol_scores(ranking, *protocol_masks(easy, hard, junk, protocol), ks=ks)
        for protocol in PROTOCOLS
    }


def _check_ranking(ranking: np.ndarray, n_queries: int) -> np.ndarray:
    ranking = np.asarray(ranking)
    if ranking.ndim != 2 or not np.issubdtype(ranking.dtype, np.integer):
        raise ConfigError(f"ranking must be a 2-D integer array (n_queries, n_ranked), got {ranking.dtype} "
                          f"of shape {ranking.shape}")
    if ranking.shape[0] != n_queries:
        hint = " (it looks transposed: pass ranking.T)" if ranking.shape[1] == n_queries else ""
        raise ConfigError(f"ranking has {ranking.shape[0]} rows for {n_queries} queries{hint}")
    if ranking.size and ranking.min() < 0:
        raise ConfigError("ranking holds negative database indices")
    return ranking


def rank_database(queries: np.ndarray, database: np.ndarray, max_batch_entries: int = 1 << 24) -> np.ndarray:
    """Full rankings by inner product: `queries (Q, D)`, `database (N, D)` -> `(Q, N)` database indices, best first."""
    from hetretrieval.index.search import iter_rankings

    return np.concatenate([batch.positions for batch in iter_rankings(queries, database,
                                                                       max_batch_entries=max_batch_entries)])


def revisited_summary(scores: dict[str, ProtocolScores]) -> dict[str, float]:
    """Flat scalars for logs and summaries: `mAP_easy`, `mP@5_hard`, ... (rounded to 6 decimals)."""
    summary = {}
    for protocol, result in scores.items():
        summary[f"mAP_{protocol}"] = round(result.mean_average_precision, 6)
        summary.update({f"mP@{k}_{protocol}": round(v, 6) for k, v in result.mean_precision_at_k.items()})
    return summary
