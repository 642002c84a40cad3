"""Metric-learning losses for fine-tuning global descriptors (Radenović et al., cirtorch).

Both losses accept two batch layouts:

- tuple batches from epoch tuple mining: descriptors ``(T, 2 + n_neg, D)``, each tuple holding a query, its
  positive and ``n_neg`` negatives, in that order (cirtorch's training tuples);
- flat batches ``(N, D)`` with ``labels (N,)`` and/or an index tuple from an in-batch miner, either triplets
  ``(anchor, positive, negative)`` or pairs ``(anchor1, positive, anchor2, negative)``, as
  pytorch-metric-learning's miners return them.

Distances are Euclidean between L2-normalised descriptors (inputs are normalised here; a no-op for descriptors
that already are). ``reduction="mean"`` averages over all pairs/triplets the batch defines, including those
whose loss is already zero; ``"sum"`` adds them up, as cirtorch does. A batch that defines no pair/triplet gives
a zero loss connected to the graph, so that every rank of a distributed run still back-propagates.
"""

from typing import Literal

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import TripletMarginLoss
from pytorch_metric_learning.reducers import MeanReducer, SumReducer
from torch import Tensor, nn

from hetretrieval.errors import ConfigError

Reduction = Literal["mean", "sum"]
PairIndices = tuple[Tensor, Tensor, Tensor, Tensor]
TripletIndices = tuple[Tensor, Tensor, Tensor]
IndexTuple = PairIndices | TripletIndices

_REDUCTIONS = ("mean", "sum")
# Squared distances are clamped here before the square root: its gradient is infinite at 0.
_MIN_SQUARED_DISTANCE = 1e-12


def tuple_triplets(n_tuples: int, tuple_size: int, device: torch.device | None = None) -> TripletIndices:
    """Triplets (query, positive, negative) of a tuple batch flattened to ``(n_tuples * tuple_size, D)``.

    ``tuple_size = 2 + n_neg``; returns three ``(n_tuples * n_neg,)`` index tensors, tuple-major.
    """
    if tuple_size < 3:
        raise ValueError(f"a tuple needs a query, a positive and at least one negative; got size {tuple_size}")
    n_negatives = tuple_size - 2
    queries = torch.arange(n_tuples, device=device).repeat_interleave(n_negatives) * tuple_size
    negatives = queries + 2 + torch.arange(n_negatives, device=device).repeat(n_tuples)
    return queries, queries + 1, negatives


def pairs_from_triplets(triplets: TripletIndices) -> PairIndices:
    """Distinct positive pairs ``(a, p)`` and distinct negative pairs ``(a, n)`` of a set of triplets.

    A cirtorch tuple thus gives one positive and ``n_neg`` negative pairs, whatever the number of its triplets.
    """
    anchors, positives, negatives = triplets
    pos_anchors, pos = torch.stack([anchors, positives]).unique(dim=1)
    neg_anchors, neg = torch.stack([anchors, negatives]).unique(dim=1)
    return pos_anchors, pos, neg_anchors, neg


def all_pairs(labels: Tensor) -> PairIndices:
    """Every unordered pair ``i < j`` of a batch: ``labels (N,)`` -> positive pairs, then negative pairs."""
    first, second = torch.triu_indices(len(labels), len(labels), offset=1, device=labels.device)
    same = labels[first] == labels[second]
    return first[same], second[same], first[~same], second[~same]


def contrastive_loss(
    embeddings: Tensor, pairs: PairIndices, margin: float, reduction: Reduction = "mean"
) -> Tensor:
    """Contrastive loss of Radenović et al.: ``(N, D)``, pair indices -> scalar.

    A positive pair costs ``0.5 * d^2``, a negative pair ``0.5 * max(0, margin - d)^2``, ``d`` the Euclidean
    distance of the L2-normalised descriptors. ``mean`` averages over positive and negative pairs together.
    """
    _check_reduction(reduction)
    x = F.normalize(embeddings, dim=-1)
    pos_anchors, positives, neg_anchors, negatives = pairs
    positive_losses = 0.5 * (x[pos_anchors] - x[positives]).pow(2).sum(dim=-1)
    negative_distances = (x[neg_anchors] - x[negatives]).pow(2).sum(dim=-1).clamp_min(_MIN_SQUARED_DISTANCE).sqrt()
    negative_losses = 0.5 * F.relu(margin - negative_distances).pow(2)
    losses = torch.cat([positive_losses, negative_losses])
    if losses.numel() == 0:
        return _zero_loss(embeddings)
    return losses.mean() if reduction == "mean" else losses.sum()


class ContrastiveLoss(nn.Module):
    """Contrastive loss over tuple batches or labelled/mined flat batches (see the module docstring).

    Pairs of a flat batch: the given pair indices; the distinct pairs of given triplets; or, with labels only,
    every unordered pair of the batch. ``margin=0.7`` is cirtorch's default for this loss.
    """

    def __init__(self, margin: float = 0.7, reduction: Reduction = "mean"):
        super().__init__()
        _check_margin(margin)
        _check_reduction(reduction)
        self.margin = margin
        self.reduction = reduction

    def forward(
        self, embeddings: Tensor, labels: Tensor | None = None, indices_tuple: IndexTuple | None = None
    ) -> Tensor:
        """``(T, 2 + n_neg, D)`` tuples, or ``(N, D)`` with labels and/or indices -> scalar."""
        embeddings, indices_tuple = _flat_batch(embeddings, labels, indices_tuple)
        if indices_tuple is None:
            pairs = all_pairs(labels)
        elif len(indices_tuple) == 3:
            pairs = pairs_from_triplets(indices_tuple)
        else:
            pairs = indices_tuple
        return contrastive_loss(embeddings, pairs, self.margin, self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}"


class TripletLoss(nn.Module):
    """Triplet loss ``max(0, d(a, p)^2 - d(a, n)^2 + margin)`` over tuple or labelled/mined flat batches.

    ``squared=False`` uses plain distances ``d`` instead of ``d^2``. Triplets of a flat batch: the given ones;
    those of given pairs sharing an anchor; or, with labels only, every (anchor, positive, negative) of the
    batch. ``margin=0.1`` is cirtorch's default for this loss. Computed by pytorch-metric-learning's
    ``TripletMarginLoss`` with a mean or sum reducer (not its default, which averages over non-zero losses only).
    """

    def __init__(self, margin: float = 0.1, squared: bool = True, reduction: Reduction = "mean"):
        super().__init__()
        _check_margin(margin)
        _check_reduction(reduction)
        self.margin = margin
        self.squared = squared
        self.reduction = reduction
        self.triplet_margin_loss = TripletMarginLoss(
            margin=margin,
            distance=LpDistance(normalize_embeddings=True, p=2, power=2 if squared else 1),
            reducer=MeanReducer() if reduction == "mean" else SumReducer(),
            triplets_per_anchor="all",
        )

    def forward(
        self, embeddings: Tensor, labels: Tensor | None = None, indices_tuple: IndexTuple | None = None
    ) -> Tensor:
        """``(T, 2 + n_neg, D)`` tuples, or ``(N, D)`` with labels and/or indices -> scalar."""
        embeddings, indices_tuple = _flat_batch(embeddings, labels, indices_tuple)
        return self.triplet_margin_loss(embeddings, labels, indices_tuple)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, squared={self.squared}, reduction={self.reduction!r}"


def _flat_batch(embeddings: Tensor, labels: Tensor | None, indices_tuple: IndexTuple | None
                ) -> tuple[Tensor, IndexTuple | None]:
    """A batch as ``(N, D)`` embeddings and its index tuple: ``(T, S, D)`` tuples are flattened into triplets;
    a flat batch must come with labels or indices."""
    if embeddings.ndim == 3:
        if labels is not None or indices_tuple is not None:
            raise ValueError("tuple batches (T, 2 + n_neg, D) define their own pairs: pass no labels or indices")
        n_tuples, tuple_size, _ = embeddings.shape
        return embeddings.flatten(0, 1), tuple_triplets(n_tuples, tuple_size, embeddings.device)
    if labels is None and indices_tuple is None:
        raise ValueError("a flat batch needs labels or an index tuple")
    return embeddings, indices_tuple


def _zero_loss(embeddings: Tensor) -> Tensor:
    """A zero that keeps the graph: gradients flow (as zeros) to everything upstream of the embeddings."""
    return embeddings.sum() * 0


def _check_margin(margin: float) -> None:
    if not margin > 0:
        raise ConfigError(f"loss margin must be positive, got {margin}")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ConfigError(f"loss reduction must be one of {_REDUCTIONS}, got {reduction!r}")
