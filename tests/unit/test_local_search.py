"""Local search (PQ index, votes, verification), re-ranking and low-rank PCA-whitening on synthetic data."""

import numpy as np
import pytest
import torch

from hetretrieval.errors import ConfigError
from hetretrieval.index.local import (
    LocalSearchOptions,
    build_descriptor_index,
    index_memory,
    local_rankings,
    rerank_rankings,
    stack_descriptors,
    vote_correspondences,
    vote_neighbours,
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


@pytest.mark.parametrize(("binary", "vote_matches"), [(False, True), (True, True), (True, False)])
def test_each_query_finds_and_verifies_its_own_scene_first(binary, vote_matches):
    rng = np.random.default_rng(0)
    database = [random_image(rng, binary=binary) for _ in range(6)]
    queries = [shifted(database[3]), shifted(database[1])]
    options = LocalSearchOptions(shortlist=3, pq_subquantizers=4, vote_matches=vote_matches)
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
    votes = np.bincount(vote_neighbours(index, owner, database[2].descriptors, 1, 4)[1], minlength=4)
    assert votes.sum() == 100 and votes[2] > 2 * np.delete(votes, 2).max()
    rows, images, _ = vote_neighbours(index, owner, database[2].descriptors, 50, 4)
    assert np.bincount(images, minlength=4).max() <= 100  # at most one vote per query descriptor and image
    assert len(np.unique(rows * 4 + images)) == len(rows)
    with pytest.raises(ConfigError, match="divide"):
        build_descriptor_index(descriptors, LocalSearchOptions(pq_subquantizers=5))


@pytest.mark.parametrize("mutual", [True, False])
def test_vote_correspondences_are_the_pair_matches_of_the_voting_descriptors(mutual):
    """Brute force: global top-k by (distance, index) gives the votes; a vote of descriptor i for image j is
    the pair match (i, nearest of i in j), kept if mutual in the pair. 2-byte codes: many ties."""
    rng = np.random.default_rng(3)
    database = [random_image(rng, n=n, dim=2, binary=True) for n in (40, 25, 60, 1, 33)]
    query = random_image(rng, n=50, dim=2, binary=True)
    descriptors, owner = stack_descriptors(database)
    keypoints = np.concatenate([f.keypoints for f in database])
    index = build_descriptor_index(descriptors, LocalSearchOptions())
    distance = np.unpackbits(query.descriptors[:, None] ^ descriptors[None], axis=-1).sum(-1)
    shortlist = np.array([2, 0, 3, 4])  # image 1 voted for but not verified
    votes = vote_neighbours(index, owner, query.descriptors, 6, len(database))
    found = vote_correspondences(query, descriptors, keypoints, votes, shortlist, len(database), mutual)
    assert len(found) == len(shortlist)
    for j, (src, dst) in zip(shortlist, found, strict=True):
        columns = np.flatnonzero(owner == j)
        expected = []
        for i, row in enumerate(distance):
            top = np.lexsort((np.arange(len(row)), row))[:6]
            if j not in owner[top]:
                continue
            nearest = columns[np.argmin(row[columns])]
            if not mutual or np.argmin(distance[:, nearest]) == i:
                expected.append((i, nearest))
        rows, nearest = np.array(expected, dtype=np.int64).reshape(-1, 2).T
        np.testing.assert_array_equal(src, query.keypoints[rows])
        np.testing.assert_array_equal(dst, keypoints[nearest])


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
