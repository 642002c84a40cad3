"""Evaluate a dataset's protocol: score every query's full ranking, summarise.

One evaluator (`evaluate_rankings`) for every ranking producer: the global faiss search (`evaluate_retrieval`),
local-feature search with spatial verification and re-ranking (`hetretrieval.index.local`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from hetretrieval.index.search import RankingBatch, iter_rankings
from hetretrieval.metrics.ap import average_precision, mean_by_group, precision_at_k, recall_at_k


@dataclass
class RetrievalResults:
    """Per-query metrics (arrays aligned with `query_ids`, record indices) and their summaries.

    `ap` is NaN for a query with no positive in the database (e.g. a class of one image); such queries are
    excluded from every mean and listed in `excluded_queries`.
    """

    query_ids: np.ndarray
    database_ids: np.ndarray
    ap: np.ndarray
    n_positives: np.ndarray
    precision: dict[int, np.ndarray]
    recall: dict[int, np.ndarray]
    neighbours: np.ndarray
    neighbour_scores: np.ndarray
    per_class: dict[str, tuple[int, float]] = field(default_factory=dict)

    @property
    def evaluated(self) -> np.ndarray:
        return np.isfinite(self.ap)

    @property
    def excluded_queries(self) -> np.ndarray:
        return self.query_ids[~self.evaluated]

    @property
    def mean_average_precision(self) -> float:
        """Global mAP: the mean AP over evaluated queries."""
        return float(np.mean(self.ap[self.evaluated])) if self.evaluated.any() else float("nan")

    @property
    def class_mean_average_precision(self) -> float:
        """Class-balanced mAP: the mean of the per-class mAPs."""
        values = [m for n, m in self.per_class.values() if n > 0]
        return float(np.mean(values)) if values else float("nan")

    def mean_precision_at(self, k: int) -> float:
        return float(np.mean(self.precision[k][self.evaluated])) if self.evaluated.any() else float("nan")

    def mean_recall_at(self, k: int) -> float:
        return float(np.mean(self.recall[k][self.evaluated])) if self.evaluated.any() else float("nan")


def label_codes(labels: Sequence[str | None]) -> np.ndarray:
    """Integer class codes, -1 for unlabelled images (never a positive)."""
    names = {name: code for code, name in enumerate(sorted({label for label in labels if label is not None}))}
    return np.array([names[label] if label is not None else -1 for label in labels], dtype=np.int64)


@dataclass(frozen=True)
class Protocol:
    """Who is searched and where: described query and database record indices, and each query's own position.

    `exclude (Q,)` is the database position of each query (removed from its ranking), or -1.
    """

    query_ids: np.ndarray
    database_ids: np.ndarray
    exclude: np.ndarray


def search_protocol(query_ids: np.ndarray, database_ids: np.ndarray, valid: np.ndarray) -> Protocol:
    """Query and database record indices restricted to the `valid (N,)` described records."""
    valid = np.asarray(valid, dtype=bool)
    query_ids = query_ids[valid[query_ids]]
    database_ids = database_ids[valid[database_ids]]
    position_in_database = np.full(valid.size, -1, dtype=np.int64)
    position_in_database[database_ids] = np.arange(database_ids.size)
    return Protocol(query_ids, database_ids, position_in_database[query_ids])


def evaluate_rankings(
    rankings: Iterable[RankingBatch], labels: Sequence[str | None], protocol: Protocol,
    ks: Sequence[int] = (1, 5, 10), top_k: int = 100,
) -> RetrievalResults:
    """AP, P@k, R@k and per-class mAP from full rankings produced by any search (global or local).

    Each `RankingBatch` holds the full database ranking `(b, N)` of queries `start .. start + b` of
    `protocol.query_ids` (positions into `protocol.database_ids`, scores descending, -inf for a dropped
    entry); batches may come in any order but must cover every query once.
    """
    query_ids, database_ids = protocol.query_ids, protocol.database_ids
    codes = label_codes(labels)
    database_codes = codes[database_ids]
    n_queries, top_k = query_ids.size, min(top_k, database_ids.size)
    ap = np.full(n_queries, np.nan)
    n_positives = np.zeros(n_queries, dtype=np.int64)
    precision = {k: np.zeros(n_queries) for k in ks}
    recall = {k: np.zeros(n_queries) for k in ks}
    neighbours = np.zeros((n_queries, top_k), dtype=np.int64)
    neighbour_scores = np.zeros((n_queries, top_k), dtype=np.float32)
    for batch in rankings:
        rows = slice(batch.start, batch.start + batch.positions.shape[0])
        query_codes = codes[query_ids[rows]]
        same_class = (database_codes[batch.positions] == query_codes[:, None]) & (query_codes[:, None] >= 0)
        relevance = same_class & np.isfinite(batch.scores)  # an unlabelled query (-1) has no positive
        n_positives[rows] = relevance.sum(axis=1)
        ap[rows] = average_precision(relevance, batch.scores)
        for k in ks:
            precision[k][rows] = precision_at_k(relevance, k)
            recall[k][rows] = recall_at_k(relevance, k, n_positives[rows])
        neighbours[rows] = database_ids[batch.positions[:, :top_k]]
        neighbour_scores[rows] = batch.scores[:, :top_k]

    query_labels = [labels[i] for i in query_ids]
    return RetrievalResults(query_ids, database_ids, ap, n_positives, precision, recall, neighbours,
                            neighbour_scores, mean_by_group(ap, query_labels))


def evaluate_retrieval(
    descriptors: np.ndarray, labels: Sequence[str | None], query_ids: np.ndarray, database_ids: np.ndarray,
    valid: np.ndarray | None = None, ks: Sequence[int] = (1, 5, 10), top_k: int = 100,
    max_batch_entries: int = 1 << 24,
) -> RetrievalResults:
    """Rank the database for every query by global descriptors and compute AP, P@k, R@k and per-class mAP.

    `descriptors (N, D)` are L2-normalised, one row per record, `labels (N,)` their classes (None: never a
    positive); `valid (N,)` marks records that were described (skipped images are dropped from both queries
    and database). A query is removed from its own ranking.
    """
    valid = np.ones(len(labels), dtype=bool) if valid is None else valid
    protocol = search_protocol(query_ids, database_ids, valid)
    rankings = iter_rankings(descriptors[protocol.query_ids], descriptors[protocol.database_ids],
                             exclude=protocol.exclude, max_batch_entries=max_batch_entries)
    return evaluate_rankings(rankings, labels, protocol, ks, top_k)


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


def metric_summary(results: RetrievalResults, ks: Sequence[int]) -> dict[str, float | None]:
    """The one metrics dictionary of a run (summary.json, loggers, validation, the study): `mAP`,
    `class_mAP`, `mP@k`, `mR@k`; None where undefined (no query with a positive)."""
    summary = {"mAP": _finite_or_none(results.mean_average_precision),
               "class_mAP": _finite_or_none(results.class_mean_average_precision)}
    for k in ks:
        summary[f"mP@{k}"] = _finite_or_none(results.mean_precision_at(k))
        summary[f"mR@{k}"] = _finite_or_none(results.mean_recall_at(k))
    return summary
