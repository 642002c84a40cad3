import itertools
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from hetretrieval.errors import ConfigError, DataError
from hetretrieval.training.mining import (
    ClassBalancedBatchSampler,
    TripletMiner,
    hardest_negatives,
    mine_epoch_tuples,
)


def _brute_hardest_negatives(descriptors, labels, query, n_negatives):
    """Candidates by (distance, index); keep the first of each class other than the query's."""
    distances = [math.dist(descriptors[query].tolist(), d.tolist()) for d in descriptors]
    taken_classes = {int(labels[query])}
    negatives = []
    for j in sorted(range(len(labels)), key=lambda j: (distances[j], j)):
        if int(labels[j]) not in taken_classes:
            taken_classes.add(int(labels[j]))
            negatives.append(j)
    return negatives[:n_negatives]


@pytest.fixture
def grid_pool():
    """Integer 2-D points (exact distances) with duplicates and equidistant points, so ties occur."""
    generator = torch.Generator().manual_seed(0)
    points = torch.randint(-3, 4, (40, 2), generator=generator).float()
    labels = torch.randint(0, 7, (40,), generator=generator) * 10 - 20  # arbitrary label values
    return points, labels


def test_hardest_negatives_match_brute_force_with_ties(grid_pool):
    points, labels = grid_pool
    queries = torch.arange(len(labels))
    negatives = hardest_negatives(points, labels, queries, n_negatives=4)
    assert negatives.shape == (40, 4)
    for q in queries.tolist():
        assert negatives[q].tolist() == _brute_hardest_negatives(points, labels, q, 4)


def test_hardest_negatives_take_one_per_class_and_never_the_query_class(grid_pool):
    points, labels = grid_pool
    negatives = hardest_negatives(points, labels, torch.arange(40), n_negatives=6)  # every other class
    for q, row in enumerate(negatives.tolist()):
        row_labels = labels[row].tolist()
        assert len(set(row_labels)) == 6
        assert int(labels[q]) not in row_labels


def test_hardest_negatives_do_not_depend_on_chunking(grid_pool):
    points, labels = grid_pool
    queries = torch.tensor([5, 0, 17, 39, 5])
    whole = hardest_negatives(points, labels, queries, 3)
    assert torch.equal(whole, hardest_negatives(points, labels, queries, 3, query_chunk_size=2))


def test_hardest_negatives_hand_computed():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 0.5]])
    labels = torch.tensor([0, 1, 1, 2, 0])
    # Query 0: class 0 excluded (index 4), class 1 nearest at index 1 (not 2), then class 2.
    assert hardest_negatives(points, labels, torch.tensor([0]), 2).tolist() == [[1, 3]]


def test_too_many_negatives_raise_config_error(grid_pool):
    points, labels = grid_pool
    with pytest.raises(ConfigError, match="n_negatives"):
        hardest_negatives(points, labels, torch.arange(3), n_negatives=7)


def test_epoch_tuples_layout(grid_pool):
    points, labels = grid_pool
    queries = torch.tensor([0, 1])
    positives = torch.stack([(labels == labels[q]).nonzero()[-1, 0] for q in queries])
    tuples = mine_epoch_tuples(points, labels, queries, positives, n_negatives=3)
    assert tuples.shape == (2, 5)
    assert torch.equal(tuples[:, 0], queries)
    assert torch.equal(tuples[:, 1], positives)
    assert torch.equal(tuples[:, 2:], hardest_negatives(points, labels, queries, 3))


def test_epoch_tuples_reject_a_positive_of_another_class():
    points = torch.randn(4, 2)
    labels = torch.tensor([0, 0, 1, 2])
    with pytest.raises(DataError, match="positive 2 of query 0"):
        mine_epoch_tuples(points, labels, torch.tensor([0]), torch.tensor([2]), n_negatives=1)


def _distances(embeddings, squared=True):
    x = F.normalize(embeddings.double(), dim=1)
    d = torch.cdist(x, x)
    return (d**2 if squared else d).tolist()


def test_batch_hard_matches_brute_force_with_ties():
    generator = torch.Generator().manual_seed(3)
    embeddings = torch.randn(10, 3, generator=generator)
    embeddings[4] = embeddings[1]  # equidistant positives and negatives for several anchors
    embeddings[7] = embeddings[1]
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3])  # class 3: no positive, so no anchor
    anchors, positives, negatives = TripletMiner("batch_hard")(embeddings, labels)
    d = _distances(embeddings)
    assert anchors.tolist() == list(range(9))
    for a, p, n in zip(anchors.tolist(), positives.tolist(), negatives.tolist(), strict=True):
        same = [j for j in range(10) if labels[j] == labels[a] and j != a]
        other = [j for j in range(10) if labels[j] != labels[a]]
        assert p in same and n in other
        assert d[a][p] == pytest.approx(max(d[a][j] for j in same), abs=1e-6)
        assert d[a][n] == pytest.approx(min(d[a][j] for j in other), abs=1e-6)


@pytest.mark.parametrize("squared", [True, False])
def test_semihard_matches_brute_force(squared):
    embeddings = torch.randn(12, 3, generator=torch.Generator().manual_seed(4))
    labels = torch.arange(12) % 3
    margin = 0.4
    d = _distances(embeddings, squared)
    expected = {
        (a, p, n)
        for a, p, n in itertools.product(range(12), repeat=3)
        if a != p and labels[a] == labels[p] and labels[a] != labels[n] and 0 < d[a][n] - d[a][p] <= margin
    }
    assert expected  # the case has semi-hard triplets
    mined = TripletMiner("semihard", margin=margin, squared=squared)(embeddings, labels)
    assert set(zip(*(t.tolist() for t in mined), strict=True)) == expected


@pytest.mark.parametrize("strategy", ["batch_hard", "semihard"])
def test_single_class_batch_mines_nothing(strategy):
    mined = TripletMiner(strategy)(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))
    assert all(len(t) == 0 for t in mined)


def test_unknown_strategy_raises_config_error():
    with pytest.raises(ConfigError, match="strategy"):
        TripletMiner("hardest")


@pytest.fixture
def unbalanced_labels():
    # Classes 0..5 with 1, 2, 4, 6, 8, 10 images: classes 0-2 are smaller than K = 4.
    return [c for c in range(6) for _ in range(max(1, 2 * c))]


def test_sampler_batches_are_p_classes_by_k_images(unbalanced_labels):
    sampler = ClassBalancedBatchSampler(unbalanced_labels, classes_per_batch=3, images_per_class=4, seed=1)
    assert len(sampler) == len(unbalanced_labels) // 12
    batches = list(sampler)
    assert len(batches) == len(sampler)
    for batch in batches:
        counts = Counter(unbalanced_labels[i] for i in batch)
        assert len(counts) == 3 and set(counts.values()) == {4}
        for c in counts:
            members = {i for i, label in enumerate(unbalanced_labels) if label == c}
            drawn = [i for i in batch if unbalanced_labels[i] == c]
            if len(members) >= 4:
                assert len(set(drawn)) == 4  # without replacement
            else:
                assert set(drawn) == members  # every image of a small class, topped up with repeats


def test_sampler_is_reproducible_per_epoch(unbalanced_labels):
    def draw(seed, epoch):
        sampler = ClassBalancedBatchSampler(unbalanced_labels, 3, 4, batches_per_epoch=5, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert draw(seed=7, epoch=2) == draw(seed=7, epoch=2)
    assert draw(seed=7, epoch=2) != draw(seed=7, epoch=3)
    assert draw(seed=7, epoch=2) != draw(seed=8, epoch=2)


def test_sampler_drives_a_dataloader(unbalanced_labels):
    dataset = torch.arange(len(unbalanced_labels))
    sampler = ClassBalancedBatchSampler(unbalanced_labels, 2, 3, batches_per_epoch=4)
    batches = list(DataLoader(dataset, batch_sampler=sampler))
    assert len(batches) == 4 and all(b.shape == (6,) for b in batches)


@pytest.mark.parametrize(
    ("classes_per_batch", "images_per_class", "batches_per_epoch"), [(7, 4, None), (1, 4, None), (2, 1, None),
                                                                     (2, 4, 0)]
)
def test_sampler_bad_settings_raise_config_error(unbalanced_labels, classes_per_batch, images_per_class,
                                                 batches_per_epoch):
    with pytest.raises(ConfigError):
        ClassBalancedBatchSampler(unbalanced_labels, classes_per_batch, images_per_class, batches_per_epoch)
