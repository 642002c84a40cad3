"""`evaluate_retrieval` / `evaluate_rankings` on a hand-ranked toy collection: exclusion of the query itself,
unlabelled images, queries without positives, dropped (-inf) entries, per-class and summary means."""

import numpy as np
import pytest

from hetretrieval.index.search import RankingBatch
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
