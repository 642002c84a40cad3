"""`evaluate_retrieval` / `evaluate_rankings` on a hand-ranked toy collection: exclusion of the query itself,
unlabelled images, queries without positives, dropped (-inf) entries, per-class and summary means; the exact
evaluation without sorting against brute force (ties, batches); truncated short-lists."""

import numpy as np
import pytest

from hetretrieval.index.search import RankingBatch, iter_rankings
from hetretrieval.metrics.ap import average_precision, average_precision_of_positives
from hetretrieval.metrics.retrieval import (
    evaluate_rankings,
    evaluate_retrieval,
    label_codes,
    metric_summary,
    search_protocol,
)

# record:      0 (a)     1 (a)       2 (b)       3 (unlabelled)  4 (a)
DESCRIPTORS = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.95, 0.3122499], [0.0, 1.0]], dtype=np.float32)
LABELS = ["a", "a", "b", None, "a"]


def test_hand_ranked_collection():
    results = evaluate_retrieval(DESCRIPTORS, LABELS, np.array([0, 1, 2]), np.arange(5), ks=(1, 2))
    # query 0 (itself dropped): 3 (unlabelled, never a positive), 1 (a), 2 (b), 4 (a) -> (1/2 + 2/4) / 2
    # query 1: 2 (0.96), 3 (0.947), 0 (0.8), 4 (0.6) -> positives at ranks 3 and 4: (1/3 + 2/4) / 2
    # query 2 (b): the only other b is itself -> no positive, excluded from every mean
    assert results.neighbours[:, :4].tolist() == [[3, 1, 2, 4], [2, 3, 0, 4], [1, 3, 4, 0]]
    np.testing.assert_allclose(results.ap[:2], [0.5, (1 / 3 + 2 / 4) / 2])
    assert np.isnan(results.ap[2]) and results.excluded_queries.tolist() == [2]
    assert results.n_positives.tolist() == [2, 2, 0]
    assert results.precision[1].tolist()[:2] == [0.0, 0.0] and results.precision[2].tolist()[:2] == [0.5, 0.0]
    assert results.recall[2].tolist()[:2] == [0.5, 0.0]
    assert results.per_class["a"] == (2, pytest.approx((0.5 + 5 / 12) / 2))
    assert results.per_class["b"][0] == 0 and np.isnan(results.per_class["b"][1])
    assert results.mean_average_precision == pytest.approx((0.5 + 5 / 12) / 2)
    assert results.class_mean_average_precision == pytest.approx((0.5 + 5 / 12) / 2)  # b has no evaluated query
    summary = metric_summary(results, ks=(1, 2))
    assert summary == {"mAP": round((0.5 + 5 / 12) / 2, 6), "class_mAP": round((0.5 + 5 / 12) / 2, 6),
                       "mP@1": 0.0, "mR@1": 0.0, "mP@2": 0.25, "mR@2": 0.25}


def test_unlabelled_images_are_never_positives():
    assert label_codes(["b", None, "a", "b"]).tolist() == [1, -1, 0, 1]
    results = evaluate_retrieval(DESCRIPTORS, [None, "a", "b", None, "a"], np.array([0]), np.arange(5))
    assert results.n_positives.tolist() == [0]  # an unlabelled query has no positives, not the other unlabelled


def test_dropped_entries_are_not_positives_and_invalid_records_leave_both_sides():
    valid = np.array([1, 1, 1, 0, 1], dtype=bool)
    protocol = search_protocol(np.array([0, 3]), np.arange(5), valid)
    assert protocol.query_ids.tolist() == [0] and protocol.database_ids.tolist() == [0, 1, 2, 4]
    assert protocol.exclude.tolist() == [0]
    # query 0 ranks database positions 1 (record 1, a), 3 (record 4, a, dropped: -inf), 2 (b), 0 (itself, -inf)
    batch = RankingBatch(0, np.array([[1, 3, 2, 0]]), np.array([[0.9, -np.inf, 0.5, -np.inf]]))
    results = evaluate_rankings([batch], LABELS, protocol, ks=(1,))
    assert results.n_positives.tolist() == [1] and results.ap.tolist() == [1.0]
    assert results.neighbours.tolist() == [[1, 4, 2, 0]]  # record indices, not database positions


def _brute_force(descriptors, labels, query_ids, database_ids, ks, cut=None):
    """Per-query AP (sklearn's tie-aware definition: distinct score thresholds), P@k and R@k from float64 scores,
    each query's own entry left out; `cut` truncates the ranking (AP still divides by every positive)."""
    ap, precision, recall = [], {k: [] for k in ks}, {k: [] for k in ks}
    for q in query_ids:
        others = np.array([i for i in database_ids if i != q])
        relevant = np.array([labels[i] is not None and labels[i] == labels[q] for i in others])
        scores = descriptors[others].astype(np.float64) @ descriptors[q].astype(np.float64)
        order = np.argsort(-scores, kind="stable")[:cut]
        scores, hits = scores[order], relevant[order]
        ends = np.append(scores[1:] != scores[:-1], True)
        found = np.cumsum(hits)[ends]
        total = relevant.sum()
        ap.append(np.sum(np.diff(found, prepend=0) * found / (np.flatnonzero(ends) + 1)) / total if total else np.nan)
        for k in ks:
            precision[k].append(hits[:k].sum() / k)
            recall[k].append(hits[:k].sum() / total if total else np.nan)
    return np.array(ap), precision, recall


def test_exact_evaluation_without_sorting_equals_brute_force_with_ties_and_unlabelled_images():
    rng = np.random.default_rng(0)
    descriptors = (rng.integers(-1, 2, size=(90, 3)) / 2).astype(np.float32)  # exact, heavily tied scores
    labels = [None if i % 7 == 0 else "abcde"[rng.integers(5)] for i in range(90)]
    query_ids, database_ids = np.arange(0, 90, 2), np.arange(10, 90)
    ap, precision, recall = _brute_force(descriptors, labels, query_ids, database_ids, (1, 3, 10))
    protocol = search_protocol(query_ids, database_ids, np.ones(90, dtype=bool))
    full = evaluate_rankings(iter_rankings(descriptors[query_ids], descriptors[database_ids], protocol.exclude),
                             labels, protocol, ks=(1, 3, 10))
    for entries in (80, 7 * 80, 1 << 20):  # one query a batch, seven, all
        results = evaluate_retrieval(descriptors, labels, query_ids, database_ids, ks=(1, 3, 10), top_k=20,
                                     max_batch_entries=entries)
        np.testing.assert_allclose(results.ap, ap, atol=1e-12)
        for k in (1, 3, 10):
            np.testing.assert_allclose(results.precision[k], precision[k], atol=1e-12)
            np.testing.assert_allclose(results.recall[k], recall[k], atol=1e-12)
        assert (results.n_positives == full.n_positives).all()
        np.testing.assert_array_equal(results.neighbours, full.neighbours[:, :20])
    np.testing.assert_allclose(full.ap, ap, atol=1e-12)


def test_average_precision_of_positives_equals_the_ranked_average_precision():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 6, size=(40, 30)).astype(np.float32)
    scores[rng.random(scores.shape) < 0.05] = -np.inf  # dropped entries: never positives
    relevance = rng.random(scores.shape) < 0.3
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked_scores = np.take_along_axis(scores, order, axis=1)
    expected = average_precision(np.take_along_axis(relevance, order, axis=1) & np.isfinite(ranked_scores),
                                 ranked_scores)
    positive_scores = np.where(relevance, scores, -np.inf)
    got = average_precision_of_positives(np.sort(scores, axis=1), positive_scores)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert np.isnan(got).tolist() == np.isnan(expected).tolist()


def test_a_truncated_ranking_counts_positives_outside_it_as_not_retrieved():
    # records 0 (a, query), 1 (a), 2 (b), 3 (a), 4 (a); the short-list of query 0 holds 1, 2, 3 only
    protocol = search_protocol(np.array([0]), np.arange(5), np.ones(5, dtype=bool))
    batch = RankingBatch(0, np.array([[1, 2, 3]]), np.array([[0.9, 0.8, 0.7]]))
    labels = ["a", "a", "b", "a", "a"]
    results = evaluate_rankings([batch], labels, protocol, ks=(1, 3), top_k=3, truncated=True)
    assert results.n_positives.tolist() == [3]  # 1, 3, 4: the query's own entry is not a positive
    np.testing.assert_allclose(results.ap, [(1 / 1 + 2 / 3) / 3])  # 4 is not retrieved: precision 0
    assert results.recall[3].tolist() == [2 / 3] and results.precision[3].tolist() == [2 / 3]
    full = evaluate_rankings([batch], labels, protocol, ks=(1,), top_k=3)
    np.testing.assert_allclose(full.ap, [(1 / 1 + 2 / 3) / 2])  # a full ranking counts what it holds


def test_duplicate_images_tie_exactly_when_the_queries_are_the_database():
    # queries and database are views of one array (every image a query): identical descriptors must score
    # identically (the GEMM must not take BLAS's symmetric path, whose mirrored half rounds differently)
    rng = np.random.default_rng(2)
    descriptors = rng.standard_normal((120, 1280)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    descriptors[[81, 89, 100]] = descriptors[80]
    descriptors[[5, 60]] = descriptors[33]
    labels = [str(i % 12) for i in range(120)]
    ids = np.arange(120)
    ap, _, _ = _brute_force(descriptors, labels, ids, ids, (1,))
    np.testing.assert_allclose(evaluate_retrieval(descriptors, labels, ids, ids, ks=(1,)).ap, ap, atol=1e-9)
