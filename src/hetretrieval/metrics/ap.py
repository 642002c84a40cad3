"""Ranking metrics over full rankings: average precision (tie-aware), precision@k and recall@k.

`relevance (Q, N)` holds, for each query, whether the item at each rank is a positive; `scores (Q, N)` the
matching similarities, in descending order. AP is the paper's non-interpolated AP over the whole ranking: the
mean, over the query's positives, of the precision at each positive's rank. When scores tie, the order inside
a tie is arbitrary, so tied items are credited together, at the precision reached after the whole tied group;
this equals `sklearn.metrics.average_precision_score` and does not depend on how the index broke the tie.

`average_precision_of_positives` gives the same AP without a ranking: a positive is credited the precision
`(positives scoring >= it) / (entries scoring >= it)`, which is the precision at the end of its tie group, so only
the positives' ranks are needed (read from the sorted scores alone, not an argsort).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def average_precision(relevance: np.ndarray, scores: np.ndarray | None = None,
                      n_positives: np.ndarray | None = None) -> np.ndarray:
    """AP per query: `(Q, N) bool, (Q, N) float -> (Q,)`; NaN for a query without positives.

    Without `scores`, every rank is its own group (plain non-interpolated AP of the given order). AP divides by
    `n_positives (Q,)` when given (a truncated ranking: positives beyond it count as not retrieved), else by the
    positives in the ranking.
    """
    relevance = np.asarray(relevance, dtype=bool)
    n_items = relevance.shape[1]
    hits = np.cumsum(relevance, axis=1)
    if scores is None:
        group_end = np.ones_like(relevance)
    else:
        group_end = np.ones_like(relevance)
        group_end[:, :-1] = scores[:, :-1] != scores[:, 1:]
    hits_at_end = np.where(group_end, hits, 0)
    hits_before_group = np.zeros_like(hits)
    hits_before_group[:, 1:] = np.maximum.accumulate(hits_at_end, axis=1)[:, :-1]
    precision = hits / np.arange(1, n_items + 1)
    gained = np.where(group_end, (hits - hits_before_group) * precision, 0.0)
    if n_positives is None:
        n_positives = hits[:, -1] if n_items else np.zeros(relevance.shape[0], dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_positives > 0, gained.sum(axis=1) / n_positives, np.nan)


def average_precision_of_positives(sorted_scores: np.ndarray, positive_scores: np.ndarray) -> np.ndarray:
    """Tie-aware AP per query from its positives' scores: `sorted_scores (Q, N)` every entry's score, each row
    ascending, `positive_scores (Q, P)` the scores of the query's positives (-inf: none, e.g. a pad or a dropped
    entry) -> `(Q,)`, NaN without positives.

    A positive is credited `(positives scoring >= it) / (entries scoring >= it)`: equal to `average_precision`
    of the descending ranking, with the ranks read by binary search instead of a ranking.
    """
    n_queries, n_items = sorted_scores.shape
    positive_scores = np.sort(positive_scores, axis=1)
    found = np.isfinite(positive_scores)
    precision = np.zeros(positive_scores.shape)
    for row in range(n_queries):
        thresholds = positive_scores[row, found[row]]
        entries = n_items - np.searchsorted(sorted_scores[row], thresholds, side="left")
        positives = positive_scores.shape[1] - np.searchsorted(positive_scores[row], thresholds, side="left")
        precision[row, found[row]] = positives / entries
    n_positives = found.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_positives > 0, precision.sum(axis=1) / n_positives, np.nan)


def precision_at_k(relevance: np.ndarray, k: int) -> np.ndarray:
    """Fraction of positives among the first k results: `(Q, N) -> (Q,)` (k beyond N counts as misses)."""
    return np.asarray(relevance[:, :k], dtype=bool).sum(axis=1) / k


def recall_at_k(relevance: np.ndarray, k: int, n_positives: np.ndarray) -> np.ndarray:
    """Fraction of a query's positives found in the first k results: `(Q, N) -> (Q,)`, NaN without positives."""
    with np.errstate(invalid="ignore", divide="ignore"):
        found = np.asarray(relevance[:, :k], dtype=bool).sum(axis=1)
        return np.where(n_positives > 0, found / np.maximum(n_positives, 1), np.nan)


def mean_by_group(values: np.ndarray, groups: Sequence) -> dict:
    """Mean of the finite `values` per group label, with the count: `{group: (n, mean)}` (sorted by group)."""
    values = np.asarray(values, dtype=np.float64)
    names = sorted(set(groups), key=str)
    code = {name: i for i, name in enumerate(names)}
    codes = np.array([code[g] for g in groups], dtype=np.int64)
    finite = np.isfinite(values)
    counts = np.bincount(codes[finite], minlength=len(names))
    sums = np.bincount(codes[finite], weights=values[finite], minlength=len(names))
    return {name: (int(n), float(total / n) if n else float("nan"))
            for name, n, total in zip(names, counts, sums, strict=True)}
