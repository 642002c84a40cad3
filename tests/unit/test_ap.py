"""Ranking metrics against sklearn and hand-computed cases."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from hetretrieval.metrics.ap import average_precision, mean_by_group, precision_at_k, recall_at_k


def _sorted(scores, relevant):
    order = np.argsort(-scores, kind="stable")
    return relevant[order][None], scores[order][None]


def test_hand_computed_ap():
    # positives at ranks 1, 3, 6 -> (1/1 + 2/3 + 3/6) / 3
    relevance = np.array([[1, 0, 1, 0, 0, 1]], dtype=bool)
    assert average_precision(relevance)[0] == pytest.approx((1 + 2 / 3 + 3 / 6) / 3)


def test_ap_uses_all_positives_of_the_full_ranking():
    relevance = np.array([[0, 0, 0, 1]], dtype=bool)
    assert average_precision(relevance)[0] == pytest.approx(0.25)


@pytest.mark.parametrize("seed", range(20))
def test_ap_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    scores = np.round(rng.random(n), 1)  # coarse values -> many ties
    relevant = rng.random(n) < 0.3
    relevant[rng.integers(n)] = True
    relevance, sorted_scores = _sorted(scores, relevant)
    assert average_precision(relevance, sorted_scores)[0] == pytest.approx(average_precision_score(relevant, scores))


def test_ties_are_credited_at_the_end_of_the_group():
    # one positive tied with one negative at the top: precision after the group is 1/2
    relevance = np.array([[True, False]])
    scores = np.array([[0.9, 0.9]])
    assert average_precision(relevance, scores)[0] == pytest.approx(0.5)
    assert average_precision(relevance[:, ::-1].copy(), scores)[0] == pytest.approx(0.5)


def test_no_positive_is_nan_and_batches_are_independent():
    relevance = np.array([[0, 0, 0], [1, 0, 0]], dtype=bool)
    ap = average_precision(relevance)
    assert np.isnan(ap[0]) and ap[1] == 1.0


def test_precision_and_recall_at_k():
    relevance = np.array([[1, 0, 1, 0, 1]], dtype=bool)
    assert precision_at_k(relevance, 1)[0] == 1.0
    assert precision_at_k(relevance, 4)[0] == 0.5
    assert precision_at_k(relevance, 10)[0] == pytest.approx(0.3)
    assert recall_at_k(relevance, 3, np.array([3]))[0] == pytest.approx(2 / 3)
    assert recall_at_k(np.array([[0, 1, 0]], bool), 2, np.array([1]))[0] == 1.0  # a single positive, found
    assert np.isnan(recall_at_k(np.zeros((1, 3), bool), 2, np.array([0]))[0])


def test_mean_by_group_ignores_nan():
    out = mean_by_group(np.array([1.0, 0.5, np.nan, 0.2]), ["a", "a", "b", "c"])
    assert out["a"] == (2, 0.75)
    assert out["b"][0] == 0 and np.isnan(out["b"][1])
    assert out["c"] == (1, pytest.approx(0.2))
