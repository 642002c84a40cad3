import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from hetretrieval.errors import ConfigError
from hetretrieval.training.losses import (
    ContrastiveLoss,
    TripletLoss,
    all_pairs,
    contrastive_loss,
    pairs_from_triplets,
    tuple_triplets,
)


def _distance(x, i, j):
    return math.dist(x[i].tolist(), x[j].tolist())


def _brute_contrastive(embeddings, labels, margin):
    """Per-pair losses over all unordered pairs, by the definition."""
    x = F.normalize(embeddings.double(), dim=1)
    losses = []
    for i, j in itertools.combinations(range(len(x)), 2):
        d = _distance(x, i, j)
        losses.append(0.5 * d**2 if labels[i] == labels[j] else 0.5 * max(0.0, margin - d) ** 2)
    return losses


def _brute_triplets(embeddings, labels, margin, squared):
    """Per-triplet losses over every (anchor, positive, negative) of the batch, by the definition."""
    x = F.normalize(embeddings.double(), dim=1)
    power = 2 if squared else 1
    losses = []
    for a, p, n in itertools.product(range(len(x)), repeat=3):
        if a != p and labels[a] == labels[p] and labels[a] != labels[n]:
            losses.append(max(0.0, _distance(x, a, p) ** power - _distance(x, a, n) ** power + margin))
    return losses


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(9, 4, generator=generator)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])  # class 3 has no positive
    return embeddings, labels


# A 2-D tuple on the unit circle: query, positive, then negatives at distance 2 and sqrt(0.4).
CIRCLE_TUPLE = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.8, 0.6]]])


def test_contrastive_hand_computed_tuple():
    positive = 0.5 * 2.0  # d = sqrt(2)
    near_negative = 0.5 * (0.7 - math.sqrt(0.4)) ** 2  # the negative at distance 2 is beyond the margin
    total = positive + near_negative
    assert ContrastiveLoss(margin=0.7, reduction="sum")(CIRCLE_TUPLE).item() == pytest.approx(total, rel=1e-6)
    assert ContrastiveLoss(margin=0.7)(CIRCLE_TUPLE).item() == pytest.approx(total / 3, rel=1e-6)


def test_triplet_hand_computed_tuple():
    # d(q, p)^2 = 2; d(q, n)^2 = 4 and 0.4.
    squared = max(0.0, 2 - 4 + 0.1) + max(0.0, 2 - 0.4 + 0.1)
    plain = max(0.0, math.sqrt(2) - 2 + 0.1) + max(0.0, math.sqrt(2) - math.sqrt(0.4) + 0.1)
    assert TripletLoss(margin=0.1, reduction="sum")(CIRCLE_TUPLE).item() == pytest.approx(squared, rel=1e-5)
    assert TripletLoss(margin=0.1)(CIRCLE_TUPLE).item() == pytest.approx(squared / 2, rel=1e-5)
    loss = TripletLoss(margin=0.1, squared=False, reduction="sum")
    assert loss(CIRCLE_TUPLE).item() == pytest.approx(plain, rel=1e-5)


def test_inputs_are_l2_normalised():
    assert ContrastiveLoss()(3 * CIRCLE_TUPLE).item() == pytest.approx(ContrastiveLoss()(CIRCLE_TUPLE).item())
    assert TripletLoss()(3 * CIRCLE_TUPLE).item() == pytest.approx(TripletLoss()(CIRCLE_TUPLE).item())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_contrastive_matches_brute_force_on_labels(batch, reduction):
    embeddings, labels = batch
    losses = _brute_contrastive(embeddings, labels, margin=1.2)
    expected = sum(losses) / len(losses) if reduction == "mean" else sum(losses)
    loss = ContrastiveLoss(margin=1.2, reduction=reduction)(embeddings, labels)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_triplet_matches_brute_force_on_labels(batch, squared, reduction):
    embeddings, labels = batch
    losses = _brute_triplets(embeddings, labels, margin=0.3, squared=squared)
    expected = sum(losses) / len(losses) if reduction == "mean" else sum(losses)
    loss = TripletLoss(margin=0.3, squared=squared, reduction=reduction)(embeddings, labels)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_triplet_mean_counts_zero_loss_triplets(batch):
    """pytorch-metric-learning's default reducer averages over non-zero losses only; ours must not."""
    embeddings, labels = batch
    losses = _brute_triplets(embeddings, labels, margin=0.3, squared=True)
    assert 0 < sum(loss > 0 for loss in losses) < len(losses)  # the case distinguishes the two reductions
    loss = TripletLoss(margin=0.3)(embeddings, labels).item()
    assert loss == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert loss != pytest.approx(sum(losses) / sum(loss > 0 for loss in losses), rel=1e-3)


def test_tuple_batches_equal_flat_batches_with_indices():
    descriptors = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(1))
    flat = descriptors.flatten(0, 1)
    triplets = tuple_triplets(3, 5)
    for loss in (ContrastiveLoss(reduction="sum"), TripletLoss(reduction="sum")):
        assert loss(descriptors).item() == pytest.approx(loss(flat, indices_tuple=triplets).item())


def test_tuple_triplets_layout():
    anchors, positives, negatives = tuple_triplets(2, 4)
    assert anchors.tolist() == [0, 0, 4, 4]
    assert positives.tolist() == [1, 1, 5, 5]
    assert negatives.tolist() == [2, 3, 6, 7]


def test_contrastive_on_tuples_uses_one_positive_and_each_negative_once():
    pos_anchors, positives, neg_anchors, negatives = pairs_from_triplets(tuple_triplets(2, 5))
    assert sorted(zip(pos_anchors.tolist(), positives.tolist(), strict=True)) == [(0, 1), (5, 6)]
    neg_pairs = sorted(zip(neg_anchors.tolist(), negatives.tolist(), strict=True))
    assert neg_pairs == [(0, 2), (0, 3), (0, 4), (5, 7), (5, 8), (5, 9)]


def test_contrastive_with_mined_pairs_matches_brute_force(batch):
    embeddings, labels = batch
    pairs = (torch.tensor([0, 3]), torch.tensor([2, 4]), torch.tensor([1, 8]), torch.tensor([5, 0]))
    x = F.normalize(embeddings.double(), dim=1)
    expected = [0.5 * _distance(x, 0, 2) ** 2, 0.5 * _distance(x, 3, 4) ** 2]
    expected += [0.5 * max(0.0, 1.5 - _distance(x, a, n)) ** 2 for a, n in [(1, 5), (8, 0)]]
    loss = ContrastiveLoss(margin=1.5)(embeddings, labels, indices_tuple=pairs)
    assert loss.item() == pytest.approx(sum(expected) / 4, rel=1e-5)


def test_all_pairs_are_unordered_and_split_by_label():
    pos_first, pos_second, neg_first, neg_second = all_pairs(torch.tensor([5, 5, 7]))
    assert list(zip(pos_first.tolist(), pos_second.tolist(), strict=True)) == [(0, 1)]
    assert list(zip(neg_first.tolist(), neg_second.tolist(), strict=True)) == [(0, 2), (1, 2)]


def test_mean_and_sum_differ_by_the_number_of_pairs(batch):
    embeddings, labels = batch
    n_pairs = len(labels) * (len(labels) - 1) // 2
    mean = ContrastiveLoss(reduction="mean")(embeddings, labels)
    total = ContrastiveLoss(reduction="sum")(embeddings, labels)
    assert total.item() == pytest.approx(n_pairs * mean.item(), rel=1e-5)


def _assert_connected_zero(loss, embeddings):
    assert loss.item() == 0.0
    loss.backward()
    assert embeddings.grad is not None
    assert torch.equal(embeddings.grad, torch.zeros_like(embeddings))


@pytest.mark.parametrize("loss", [ContrastiveLoss(), TripletLoss()], ids=["contrastive", "triplet"])
def test_no_pair_gives_a_connected_zero(loss):
    embeddings = torch.randn(1, 4, requires_grad=True)
    _assert_connected_zero(loss(embeddings, torch.tensor([0])), embeddings)


def test_triplet_single_class_batch_gives_a_connected_zero():
    embeddings = torch.randn(4, 3, requires_grad=True)
    _assert_connected_zero(TripletLoss()(embeddings, torch.zeros(4, dtype=torch.long)), embeddings)


@pytest.mark.parametrize("loss", [ContrastiveLoss(), TripletLoss()], ids=["contrastive", "triplet"])
def test_empty_mined_indices_give_a_connected_zero(loss):
    embeddings = torch.randn(4, 3, requires_grad=True)
    empty = torch.empty(0, dtype=torch.long)
    _assert_connected_zero(loss(embeddings, torch.arange(4), (empty, empty, empty)), embeddings)


def test_contrastive_single_class_batch_uses_positive_pairs_only():
    embeddings = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    labels = torch.zeros(3, dtype=torch.long)
    expected = _brute_contrastive(embeddings, labels, margin=0.7)
    loss = ContrastiveLoss()(embeddings, labels)
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-5)


def test_contrastive_gradient_is_finite_for_coincident_descriptors():
    """Identical descriptors (d = 0) in a positive and a negative pair must not give NaN gradients."""
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    pairs = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))
    loss = contrastive_loss(embeddings, pairs, margin=0.7)
    assert loss.item() == pytest.approx(0.5 * 0.7**2 / 2, abs=1e-5)
    loss.backward()
    assert torch.isfinite(embeddings.grad).all()


def test_triplet_gradient_is_finite_for_coincident_anchor_and_positive():
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.9, 0.1]], requires_grad=True)
    triplet = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    loss = TripletLoss(margin=0.5)(embeddings, indices_tuple=triplet)
    assert loss.item() > 0
    loss.backward()
    assert torch.isfinite(embeddings.grad).all()


@pytest.mark.parametrize("factory", [ContrastiveLoss, TripletLoss])
def test_bad_settings_raise_config_error(factory):
    with pytest.raises(ConfigError):
        factory(reduction="avg")
    with pytest.raises(ConfigError):
        factory(margin=0.0)


def test_tuple_batch_with_labels_is_rejected():
    with pytest.raises(ValueError, match="tuple batches"):
        ContrastiveLoss()(CIRCLE_TUPLE, labels=torch.zeros(4))
