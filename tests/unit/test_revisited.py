"""Revisited E/M/H protocol: hand-computed cases and edge cases (real-data checks: integration)."""

from types import SimpleNamespace

import numpy as np
import pytest

from hetretrieval.errors import ConfigError
from hetretrieval.metrics.revisited import evaluate_revisited, label_masks, protocol_masks, protocol_scores


def _query(easy=(), hard=(), junk=()):
    return SimpleNamespace(easy=np.array(easy, dtype=np.int64), hard=np.array(hard, dtype=np.int64),
                           junk=np.array(junk, dtype=np.int64))


def _masks(n_db, positives, junk=()):
    positive = np.zeros((1, n_db), dtype=bool)
    positive[0, list(positives)] = True
    junk_mask = np.zeros((1, n_db), dtype=bool)
    junk_mask[0, list(junk)] = True
    return positive, junk_mask


def test_trapezoidal_ap_and_capped_precision_by_hand():
    # positives at 0-based ranks 1 and 3: AP = ((0 + 1/2)/2 + (1/3 + 2/4)/2) / 2 = 1/3
    scores = protocol_scores(np.array([[0, 1, 2, 3]]), *_masks(4, [1, 3]), ks=(1, 2, 5, 10))
    assert scores.average_precision[0] == pytest.approx(1 / 3)
    # P@k caps k at the last positive's rank (4): P@1 = 0/1, P@2 = 1/2, P@5 = P@10 = 2/4
    np.testing.assert_allclose(scores.precision_at_k[0], [0.0, 0.5, 0.5, 0.5])


def test_junk_is_removed_before_ranks_are_counted():
    # ranking 0 1 2 3 with junk {0, 2}: positives 1 and 3 move to ranks 0 and 1 -> perfect
    scores = protocol_scores(np.array([[0, 1, 2, 3]]), *_masks(4, [1, 3], junk=[0, 2]))
    assert scores.average_precision[0] == pytest.approx(1.0)
    assert scores.mean_precision_at_k == {1: 1.0, 5: 1.0, 10: 1.0}


def test_an_image_both_positive_and_junk_counts_as_the_official_code_counts_it():
    # official compute_map: a positive's rank drops the junk strictly before it, so image 0 (positive and junk)
    # keeps rank 0 and is dropped before image 2 (rank 2 - 1 = 1): ranks 0, 1 -> AP 1
    scores = protocol_scores(np.array([[0, 1, 2]]), *_masks(3, [0, 2], junk=[0]))
    assert scores.average_precision[0] == pytest.approx(1.0)


def test_single_positive_at_rank_r_gives_half_of_two_precisions():
    # one positive at rank 2: (0/2 + 1/3) / 2
    scores = protocol_scores(np.array([[4, 3, 0, 1, 2]]), *_masks(5, [0]))
    assert scores.average_precision[0] == pytest.approx(1 / 6)


def test_truncated_ranking_counts_missing_positives_against_ap():
    # 2 positives, only one retrieved at rank 0: AP = (1 + 1) / 2 * 1/2
    scores = protocol_scores(np.array([[0, 2]]), *_masks(4, [0, 3]))
    assert scores.average_precision[0] == pytest.approx(0.5)
    no_hit = protocol_scores(np.array([[1, 2]]), *_masks(4, [0, 3]))
    assert no_hit.average_precision[0] == 0.0
    np.testing.assert_array_equal(no_hit.precision_at_k[0], 0.0)


def test_protocols_route_easy_hard_junk():
    easy = np.array([[1, 0, 0, 0]], dtype=bool)
    hard = np.array([[0, 1, 0, 0]], dtype=bool)
    junk = np.array([[0, 0, 1, 0]], dtype=bool)
    pairs = {p: protocol_masks(easy, hard, junk, p) for p in ("easy", "medium", "hard")}
    np.testing.assert_array_equal(pairs["easy"][0], easy)
    np.testing.assert_array_equal(pairs["easy"][1], hard | junk)
    np.testing.assert_array_equal(pairs["medium"][0], easy | hard)
    np.testing.assert_array_equal(pairs["medium"][1], junk)
    np.testing.assert_array_equal(pairs["hard"][0], hard)
    np.testing.assert_array_equal(pairs["hard"][1], easy | junk)
    with pytest.raises(ConfigError):
        protocol_masks(easy, hard, junk, "extreme")


def test_evaluate_revisited_by_hand():
    queries = [_query(easy=[0], hard=[3], junk=[1]), _query(easy=[2], hard=[], junk=[])]
    ranking = np.array([[1, 3, 0, 2], [2, 0, 1, 3]])
    scores = evaluate_revisited(ranking, queries)
    # query 0, easy: junk {1, 3} removed -> easy image at rank 0
    assert scores["easy"].average_precision.tolist() == [1.0, 1.0]
    # query 0, medium: junk {1} removed -> 3 and 0 at ranks 0, 1 -> perfect
    assert scores["medium"].average_precision[0] == pytest.approx(1.0)
    # query 0, hard: junk {1, 0} removed -> 3 at rank 0; query 1 has no hard image and is excluded
    assert scores["hard"].average_precision[0] == pytest.approx(1.0)
    assert np.isnan(scores["hard"].average_precision[1])
    assert np.isnan(scores["hard"].precision_at_k[1]).all()
    assert scores["hard"].mean_average_precision == pytest.approx(1.0)


def test_query_without_positives_is_excluded_from_the_mean():
    queries = [_query(easy=[0]), _query(easy=[]), _query(easy=[1])]
    ranking = np.array([[0, 1], [0, 1], [0, 1]])
    easy = evaluate_revisited(ranking, queries)["easy"]
    # AP: 1 and (0/1 + 1/2)/2 = 0.25 -> mean over the two evaluated queries
    assert easy.mean_average_precision == pytest.approx((1.0 + 0.25) / 2)
    assert np.isnan(easy.average_precision[1])


def test_no_positive_at_all_gives_nan_means():
    scores = evaluate_revisited(np.array([[0, 1]]), [_query(junk=[0])])["medium"]
    assert np.isnan(scores.mean_average_precision)
    assert all(np.isnan(v) for v in scores.mean_precision_at_k.values())


def test_label_masks():
    easy, hard, junk = label_masks([_query(easy=[0, 2], hard=[1], junk=[3]), _query()], n_db=4)
    np.testing.assert_array_equal(easy, [[1, 0, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(hard, [[0, 1, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(junk, [[0, 0, 0, 1], [0, 0, 0, 0]])


def test_bad_rankings_are_refused():
    queries = [_query(easy=[0]), _query(easy=[1]), _query(easy=[2])]
    with pytest.raises(ConfigError, match="transposed"):
        evaluate_revisited(np.zeros((5, 3), dtype=np.int64), queries)
    with pytest.raises(ConfigError, match="integer"):
        evaluate_revisited(np.zeros((3, 5)), queries)
    with pytest.raises(ConfigError, match="negative"):
        evaluate_revisited(-np.ones((3, 5), dtype=np.int64), queries)
    with pytest.raises(ConfigError, match="k >= 1"):
        evaluate_revisited(np.zeros((3, 5), dtype=np.int64), queries, ks=(0,))
