"""Evaluate a dataset's protocol: score every query's full ranking, summarise.

One evaluator (`evaluate_rankings`) for every ranking producer: exact or approximate global search, local-feature
search with spatial verification and re-ranking (`hetretrieval.index.local`). The exact global search is also
scored without sorting (`evaluate_similarities`, what `evaluate_retrieval` uses): same metrics, same ties.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from hetretrieval.index.search import RankingBatch, select_rows, similarity_batches, stable_top_k
from hetretrieval.metrics.ap import (
    average_precision,
    average_precision_of_positives,
    mean_by_group,
    precision_at_k,
    recall_at_k,
)

FULL_RANKING_AP = "full ranking: every positive is ranked; tied scores credited together"
SHORTLIST_AP = ("AP over each query's short-list (exactly re-scored, ties credited together): a positive outside "
                "it counts as not retrieved (precision 0), AP and R@k dividing by all the query's positives, as "
                "short-list evaluations of large databases (e.g. Revisited Oxford/Paris +1M) do")


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


class _Collector:
    """The per-query arrays of `RetrievalResults`, filled batch by batch by either evaluator."""

    def __init__(self, labels: Sequence[str | None], protocol: Protocol, ks: Sequence[int], top_k: int) -> None:
        self.labels, self.protocol, self.ks = labels, protocol, ks
        codes = label_codes(labels)
        self.query_codes, self.database_codes = codes[protocol.query_ids], codes[protocol.database_ids]
        n_queries, self.top_k = protocol.query_ids.size, min(top_k, protocol.database_ids.size)
        self.ap = np.full(n_queries, np.nan)
        self.n_positives = np.zeros(n_queries, dtype=np.int64)
        self.precision = {k: np.zeros(n_queries) for k in ks}
        self.recall = {k: np.zeros(n_queries) for k in ks}
        self.neighbours = np.zeros((n_queries, self.top_k), dtype=np.int64)
        self.neighbour_scores = np.zeros((n_queries, self.top_k), dtype=np.float32)
        self.by_class = np.argsort(self.database_codes, kind="stable")  # database positions grouped by class
        sorted_codes = self.database_codes[self.by_class]
        classes = np.arange(codes.max(initial=-1) + 1)  # code -1 (unlabelled) reads the trailing empty class
        self.class_start = np.append(np.searchsorted(sorted_codes, classes, side="left"), 0)
        self.class_size = np.append(np.searchsorted(sorted_codes, classes, side="right"), 0) - self.class_start

    def relevance(self, rows: slice, positions: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Whether each ranked entry `(b, R)` is a positive of its query: same label, not dropped (-inf)."""
        query_codes = self.query_codes[rows, None]
        return (self.database_codes[positions] == query_codes) & (query_codes >= 0) & np.isfinite(scores)

    def positives(self, rows: slice) -> np.ndarray:
        """Database positions of the positives of queries `rows`: `(b, P)`, -1 pads (the query's own entry
        included: it scores -inf)."""
        codes = self.query_codes[rows]
        sizes = self.class_size[codes]
        slots = np.arange(sizes.max(initial=0))
        inside = slots[None, :] < sizes[:, None]
        return np.where(inside, self.by_class[np.where(inside, self.class_start[codes][:, None] + slots, 0)], -1)

    def database_positives(self, rows: slice) -> np.ndarray:
        """How many positives each query of `rows` has in the whole database, its own entry left out: `(b,)`."""
        codes, exclude = self.query_codes[rows], self.protocol.exclude[rows]
        own = (exclude >= 0) & (codes >= 0) & (self.database_codes[np.maximum(exclude, 0)] == codes)
        return self.class_size[codes] - own

    def add(self, rows: slice, ap: np.ndarray, n_positives: np.ndarray, relevance: np.ndarray,
            positions: np.ndarray, scores: np.ndarray) -> None:
        """Store the metrics of queries `rows` from the first entries of their rankings: `relevance`,
        `positions`, `scores (b, R)`, R at least `top_k` and every k (or the database size)."""
        self.ap[rows], self.n_positives[rows] = ap, n_positives
        for k in self.ks:
            self.precision[k][rows] = precision_at_k(relevance, k)
            self.recall[k][rows] = recall_at_k(relevance, k, n_positives)
        self.neighbours[rows] = self.protocol.database_ids[positions[:, : self.top_k]]
        self.neighbour_scores[rows] = scores[:, : self.top_k]

    def results(self) -> RetrievalResults:
        query_ids = self.protocol.query_ids
        query_labels = [self.labels[i] for i in query_ids]
        return RetrievalResults(query_ids, self.protocol.database_ids, self.ap, self.n_positives, self.precision,
                                self.recall, self.neighbours, self.neighbour_scores,
                                mean_by_group(self.ap, query_labels))


def evaluate_rankings(
    rankings: Iterable[RankingBatch], labels: Sequence[str | None], protocol: Protocol,
    ks: Sequence[int] = (1, 5, 10), top_k: int = 100, truncated: bool = False,
) -> RetrievalResults:
    """AP, P@k, R@k and per-class mAP from rankings produced by any search (global or local).

    Each `RankingBatch` holds the database ranking `(b, R)` of queries `start .. start + b` of
    `protocol.query_ids` (positions into `protocol.database_ids`, scores descending, -inf for a dropped
    entry); batches may come in any order but must cover every query once. Rankings are full (R = N), or
    `truncated` short-lists (R at least `top_k` and every k): then a positive outside the list counts as not
    retrieved, AP and R@k dividing by all the query's positives in the database.
    """
    collector = _Collector(labels, protocol, ks, top_k)
    for batch in rankings:
        rows = slice(batch.start, batch.start + batch.positions.shape[0])
        relevance = collector.relevance(rows, batch.positions, batch.scores)
        n_positives = collector.database_positives(rows) if truncated else relevance.sum(axis=1)
        collector.add(rows, average_precision(relevance, batch.scores, n_positives), n_positives, relevance,
                      batch.positions, batch.scores)
    return collector.results()


def evaluate_similarities(
    batches: Iterable[tuple[int, np.ndarray]], labels: Sequence[str | None], protocol: Protocol,
    ks: Sequence[int] = (1, 5, 10), top_k: int = 100,
) -> RetrievalResults:
    """`evaluate_rankings` of the exact full rankings, straight from similarity batches (`similarity_batches`:
    `(start, scores (b, N))`, -inf for a dropped entry), with no argsort: P@k, R@k and the neighbours from the
    stable top-k, then AP from the positives' ranks in the same block, sorted in place
    (`average_precision_of_positives`)."""
    collector = _Collector(labels, protocol, ks, top_k)
    width = max(top_k, *ks)
    for start, scores in batches:
        rows = slice(start, start + scores.shape[0])
        positions, values = stable_top_k(scores, width)
        positives = collector.positives(rows)
        positive_scores = np.where(positives >= 0, np.take_along_axis(scores, np.maximum(positives, 0), 1), -np.inf)
        relevance = collector.relevance(rows, positions, values)
        scores.sort(axis=1)
        ap = average_precision_of_positives(scores, positive_scores)
        collector.add(rows, ap, np.isfinite(positive_scores).sum(axis=1), relevance, positions, values)
    return collector.results()


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
    batches = similarity_batches(select_rows(descriptors, protocol.query_ids),
                                 select_rows(descriptors, protocol.database_ids), protocol.exclude, max_batch_entries)
    return evaluate_similarities(batches, labels, protocol, ks, top_k)


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
