"""αQE and DBA against brute-force loops, and as the scoring step of `score_global`."""

import numpy as np
import pytest
from omegaconf import OmegaConf

from hetretrieval.config import EvaluationOptions, ExpansionOptions, typed
from hetretrieval.data.datasets import ImageRecord, RetrievalDataset
from hetretrieval.errors import ConfigError
from hetretrieval.evaluation.scoring import score_global
from hetretrieval.index.expansion import (
    database_augmentation,
    expand_for_search,
    query_expansion,
    top_neighbours,
)
from hetretrieval.metrics.retrieval import metric_summary


def _unit(rng: np.random.Generator, n: int, d: int = 8) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _brute_force(vector: np.ndarray, database: np.ndarray, k: int, alpha: float, exclude: int = -1) -> np.ndarray:
    """One vector by the definition: itself plus its top-k database neighbours (never `exclude`), each weighted
    by max(similarity, 0) ** alpha, L2-normalised."""
    similarities = database.astype(np.float64) @ vector.astype(np.float64)
    order = [j for j in np.argsort(-similarities, kind="stable") if j != exclude][:k]
    total = vector.astype(np.float64).copy()
    for j in order:
        total += max(similarities[j], 0.0) ** alpha * database[j]
    return total / np.linalg.norm(total)


@pytest.mark.parametrize("k", [1, 3, 40])  # 40: more than the database holds
@pytest.mark.parametrize("alpha", [0.0, 3.0])
def test_alpha_qe_matches_brute_force(k, alpha):
    rng = np.random.default_rng(0)
    database, queries = _unit(rng, 12), _unit(rng, 5)
    exclude = np.array([-1, 3, -1, 11, 0])  # queries 1, 3, 4 are also database entries 3, 11, 0
    queries[1], queries[3], queries[4] = database[3], database[11], database[0]
    expanded = query_expansion(queries, database, k, alpha, exclude)
    expected = np.stack([_brute_force(q, database, k, alpha, e) for q, e in zip(queries, exclude, strict=True)])
    np.testing.assert_allclose(expanded, expected, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 40])
@pytest.mark.parametrize("alpha", [0.0, 3.0])
def test_dba_matches_brute_force(k, alpha):
    database = _unit(np.random.default_rng(1), 10)
    expected = np.stack([_brute_force(d, database, k, alpha, i) for i, d in enumerate(database)])
    np.testing.assert_allclose(database_augmentation(database, k, alpha), expected, atol=1e-5)


def test_a_query_never_expands_with_itself():
    database = np.eye(3, dtype=np.float32)
    database[2] = np.array([0.8, 0.6, 0.0], dtype=np.float32)  # nearest to entry 0
    query = database[:1].copy()
    positions, similarities = top_neighbours(query, database, 1, np.array([0]))
    assert positions.tolist() == [[2]] and similarities[0, 0] == pytest.approx(0.8)
    positions, _ = top_neighbours(query, database, 5, np.array([0]))  # k > N - 1: the gap is marked
    assert positions.tolist() == [[2, 1, -1]]
    np.testing.assert_allclose(query_expansion(query, database, 1, 1.0, np.array([0])),
                               _brute_force(query[0], database, 1, 1.0, 0)[None], atol=1e-6)


def test_expand_for_search_is_dba_then_qe_on_the_augmented_database():
    rng = np.random.default_rng(2)
    database, queries, exclude = _unit(rng, 9), _unit(rng, 4), np.array([-1, -1, 2, -1])
    qe, dba = ExpansionOptions(k=2, alpha=3.0), ExpansionOptions(k=3, alpha=1.0)
    searched_queries, searched_database = expand_for_search(queries, database, exclude, qe, dba)
    augmented = database_augmentation(database, 3, 1.0)
    np.testing.assert_allclose(searched_database, augmented, atol=1e-6)
    np.testing.assert_allclose(searched_queries, query_expansion(queries, augmented, 2, 3.0, exclude), atol=1e-6)
    same_queries, same_database = expand_for_search(queries, database, exclude, None, None)
    assert same_queries is queries and same_database is database


def _dataset(n_classes: int = 4, per_class: int = 4) -> RetrievalDataset:
    records = tuple(ImageRecord(f"/images/{c}_{i}.jpg", f"class{c}") for c in range(n_classes)
                    for i in range(per_class))
    everything = np.arange(len(records))
    return RetrievalDataset("toy", records, everything, everything)


def test_score_global_scores_before_and_after_expansion():
    dataset = _dataset()
    rng = np.random.default_rng(3)
    centres = _unit(rng, 4, 16)
    descriptors = np.repeat(centres, 4, axis=0) + 0.9 * rng.normal(size=(16, 16)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    kept = descriptors.copy()
    valid = np.ones(16, dtype=bool)
    plain = score_global(descriptors, valid, dataset, EvaluationOptions(ks=[1]))
    options = EvaluationOptions(ks=[1], query_expansion=ExpansionOptions(2, 3.0), dba=ExpansionOptions(1, 3.0))
    expanded = score_global(descriptors, valid, dataset, options)
    np.testing.assert_array_equal(descriptors, kept)  # the saved descriptors stay unexpanded
    assert "mAP_before_expansion" not in plain.info
    assert expanded.info["mAP_before_expansion"] == metric_summary(plain.results, [1])["mAP"]
    assert expanded.info["query_expansion"] == {"k": 2, "alpha": 3.0} and expanded.info["dba"] == {"k": 1,
                                                                                                    "alpha": 3.0}
    assert metric_summary(expanded.results, [1])["mAP"] != expanded.info["mAP_before_expansion"]


@pytest.mark.parametrize(("node", "key"), [({"query_expansion": {"k": 0, "alpha": 3}}, "evaluation.query_expansion.k"),
                                           ({"dba": {"k": 2, "alpha": -1}}, "evaluation.dba.alpha"),
                                           ({"dba": {"k": 2, "beta": 1}}, "evaluation.dba.beta")])
def test_expansion_options_are_checked_at_start_up(node, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        typed(OmegaConf.create(node), EvaluationOptions, "evaluation")
    on = typed(OmegaConf.create({"query_expansion": {"k": 2, "alpha": 3}}), EvaluationOptions, "evaluation")
    assert on.expands and on.query_expansion == ExpansionOptions(2, 3.0) and on.dba is None
