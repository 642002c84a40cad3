"""Local search (PQ index, votes, verification), re-ranking and low-rank PCA-whitening on synthetic data."""

import numpy as np
import pytest
import torch

from hetretrieval.errors import ConfigError
from hetretrieval.index.local import (
    LocalSearchOptions,
    build_descriptor_index,
    count_votes,
    index_memory,
    local_rankings,
    rerank_rankings,
    stack_descriptors,
)
from hetretrieval.index.search import RankingBatch
from hetretrieval.models.local.features import LocalFeatures
from hetretrieval.models.local.ransac import GeometricVerifier
from hetretrieval.models.whitening import fit_pca_whitening, fit_pca_whitening_in_span

VERIFIER = GeometricVerifier(threshold=2.0, iterations=200)


def random_image(rng, n=60, dim=16, binary=False) -> LocalFeatures:
    descriptors = (rng.integers(0, 256, (n, dim), dtype=np.uint8) if binary
                   else rng.normal(size=(n, dim)).astype(np.float32))
    if not binary:
        descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    return LocalFeatures(rng.uniform(0, 200, (n, 2)).astype(np.float32), descriptors,
                         np.ones(n, np.float32), (200, 200))


def shifted(features: LocalFeatures, offset=(5.0, -3.0)) -> LocalFeatures:
    """The same scene seen from a translated viewpoint: same descriptors, moved keypoints."""
    return LocalFeatures(features.keypoints + np.float32(offset), features.descriptors, features.scores,
                         features.image_size)


@pytest.mark.parametrize("binary", [False, True])
def test_each_query_finds_and_verifies_its_own_scene_first(binary):
    rng = np.random.default_rng(0)
    database = [random_image(rng, binary=binary) for _ in range(6)]
    queries = [shifted(database[3]), shifted(database[1])]
    options = LocalSearchOptions(shortlist=3, pq_subquantizers=4)
    batches = list(local_rankings(queries, database, np.array([-1, 5]), VERIFIER, options))
    assert [b.start for b in batches] == [0, 1]
    assert batches[0].positions[0, 0] == 3 and batches[1].positions[0, 0] == 1
    assert batches[0].scores[0, 0] >= 50  # ~all 60 correspondences are inliers of the translation
    assert batches[1].positions[0, -1] == 5 and batches[1].scores[0, -1] == -np.inf  # excluded image last
    for batch in batches:
        assert sorted(batch.positions[0]) == list(range(6)) and np.all(np.diff(batch.scores[0]) <= 0)


def test_pq_index_codes_float_descriptors_in_fewer_bytes_and_votes_once_per_image():
    rng = np.random.default_rng(1)
    database = [random_image(rng, n=100, dim=32) for _ in range(4)]
    descriptors, owner = stack_descriptors(database)
    index = build_descriptor_index(descriptors, LocalSearchOptions(pq_subquantizers=8))
    memory = index_memory(index, descriptors)
    # 400 descriptors train 2^3-centroid codebooks: 8 sub-quantisers x 3 bits
    assert memory["index"] == "IndexPQ" and memory["code_bytes"] == 3 and memory["flat_bytes"] == 400 * 32 * 4
    assert memory["index_bytes"] < memory["flat_bytes"]
    votes = count_votes(index, owner, database[2].descriptors, neighbours=1, n_images=4)
    assert votes.sum() == 100 and votes[2] > 2 * np.delete(votes, 2).max()
    votes = count_votes(index, owner, database[2].descriptors, neighbours=50, n_images=4)
    assert votes.max() <= 100  # at most one vote per query descriptor and image
    with pytest.raises(ConfigError, match="divide"):
        build_descriptor_index(descriptors, LocalSearchOptions(pq_subquantizers=5))


def test_reranking_sorts_the_top_k_by_inliers_and_keeps_the_rest():
    rng = np.random.default_rng(2)
    database = [random_image(rng) for _ in range(5)]
    query = shifted(database[2])
    ranking = RankingBatch(0, np.array([[0, 1, 2, 3, 4]]), np.array([[0.9, 0.8, 0.7, 0.6, -np.inf]]))
    (reranked,) = rerank_rankings([ranking], [query], database, VERIFIER, top_k=3)
    np.testing.assert_array_equal(reranked.positions, [[2, 0, 1, 3, 4]])  # 0 and 1 tie (no inliers): kept order
    assert np.all(np.diff(reranked.scores[0, :4]) < 0) and reranked.scores[0, 3] == 0.6
    assert reranked.scores[0, 4] == -np.inf


def test_pca_whitening_in_span_matches_the_full_fit_and_handles_more_dimensions_than_samples():
    x = torch.randn(50, 8, dtype=torch.float64) @ torch.randn(8, 8, dtype=torch.float64)
    mean, projection = fit_pca_whitening_in_span(x, dim=5)
    reference_mean, reference = fit_pca_whitening(x, dim=5)
    torch.testing.assert_close(mean, reference_mean)
    torch.testing.assert_close(projection.abs(), reference.abs())  # same axes, signs may differ
    wide = torch.randn(20, 300, dtype=torch.float64)
    mean, projection = fit_pca_whitening_in_span(wide, dim=4096)
    assert projection.shape == (19, 300)  # capped by the rank of 20 centred samples
    whitened = (wide - mean) @ projection.T
    torch.testing.assert_close(whitened.T @ whitened / 20, torch.eye(19, dtype=torch.float64))
