"""Ranking metrics over full rankings: average precision (tie-aware), precision@k and recall@k.

`relevance (Q, N)` holds, for each query, whether the item at each rank is a positive; `scores (Q, N)` the
matching similarities, in descending order. AP is the paper's non-interpolated AP over the whole ranking: the
mean, over the query's positives, of the precision at each positive's rank. When scores tie, the order inside
a tie is arbitrary, so tied items are credited together, at the precision reached after the whole tied group;
this equals `sklearn.metrics.average_precision_score` and does not depend on how the index broke the tie.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def average_precision(relevance: np.ndarray, scores: np.ndarray | None = None) -> np.ndarray:
    """AP per query: `(Q, N) bool, (Q, N) float -> (Q,)`; NaN for a query without positives.

    Without `scores`, every rank is its own group (plain non-interpolated AP of the given order).
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
    n_positives = hits[:, -1] if n_items else np.zeros(relevance.shape[0], dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_positives > 0, gained.sum(axis=1) / n_positives, np.nan)


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
    out = {}
    for group in sorted(set(groups), key=str):
        selected = values[[g == group for g in groups]]
        selected = selected[np.isfinite(selected)]
        out[group] = (int(selected.size), float(selected.mean()) if selected.size else float("nan"))
    return out
