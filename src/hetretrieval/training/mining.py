"""Training-example mining: epoch tuples over a descriptor pool, in-batch triplets, class-balanced batches.

Epoch tuple mining follows Radenović et al. (cirtorch): once per epoch the caller extracts descriptors of the
queries and of a pool of candidates with the current model; each query then gets its positive and the
``n_negatives`` pool images nearest to it, at most one per class and none of its own class, so that the
negatives are hard and diverse. In-batch mining picks triplets within a class-balanced batch (P classes x K
images) drawn by :class:`ClassBalancedBatchSampler`.
"""

from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.miners import BatchHardMiner, TripletMarginMiner
from torch import Tensor, nn
from torch.utils.data import Sampler

from hetretrieval.errors import ConfigError, DataError
from hetretrieval.training.losses import TripletIndices

MiningStrategy = Literal["batch_hard", "semihard"]

_STRATEGIES = ("batch_hard", "semihard")


def hardest_negatives(
    descriptors: Tensor,
    labels: Tensor,
    query_indices: Tensor,
    n_negatives: int,
    query_chunk_size: int = 1024,
) -> Tensor:
    """The ``n_negatives`` nearest descriptors of each query, at most one per class, none of its class.

    ``descriptors (N, D)`` hold the queries and the candidate pool; ``labels (N,)``; ``query_indices (Q,)``
    index into them -> ``(Q, n_negatives)`` indices, nearest first (Euclidean distance). Exact and
    deterministic: ties go to the lower index. Memory grows as ``query_chunk_size x N``.
    """
    if n_negatives < 1:
        raise ConfigError(f"n_negatives must be at least 1, got {n_negatives}")
    classes, class_of = torch.unique(labels, return_inverse=True)
    n_classes, n_pool = len(classes), len(labels)
    if n_negatives > n_classes - 1:
        raise ConfigError(
            f"n_negatives={n_negatives} needs as many classes besides the query's; the pool has {n_classes - 1}"
        )
    pool_order = torch.arange(n_pool, device=descriptors.device)
    chunks = []
    for queries in query_indices.split(query_chunk_size):
        distances = torch.cdist(descriptors[queries], descriptors)  # (q, N)
        pool_classes = class_of.expand_as(distances)
        # Nearest member of every class: its distance, then its index (the lowest among ties).
        class_distance = distances.new_full((len(queries), n_classes), torch.inf)
        class_distance.scatter_reduce_(1, pool_classes, distances, reduce="amin")
        is_class_nearest = distances == class_distance.gather(1, pool_classes)
        nearest_index = torch.where(is_class_nearest, pool_order, n_pool)
        class_nearest = nearest_index.new_full((len(queries), n_classes), n_pool)
        class_nearest.scatter_reduce_(1, pool_classes, nearest_index, reduce="amin")
        class_distance[torch.arange(len(queries)), class_of[queries]] = torch.inf
        # Classes ordered by (distance, index of their nearest member): sort by index, then stably by distance.
        by_index = class_nearest.argsort(dim=1)
        by_distance = class_distance.gather(1, by_index).argsort(dim=1, stable=True)
        nearest_classes = by_index.gather(1, by_distance[:, :n_negatives])
        chunks.append(class_nearest.gather(1, nearest_classes))
    return torch.cat(chunks) if chunks else query_indices.new_empty((0, n_negatives))


def mine_epoch_tuples(
    descriptors: Tensor,
    labels: Tensor,
    query_indices: Tensor,
    positive_indices: Tensor,
    n_negatives: int,
    query_chunk_size: int = 1024,
) -> Tensor:
    """cirtorch's training tuples: ``(N, D)``, ``(N,)``, ``(Q,)``, ``(Q,)`` -> ``(Q, 2 + n_negatives)`` indices.

    Row ``i`` is ``[query_i, positive_i, negatives...]`` with the negatives of :func:`hardest_negatives`; the
    descriptors are extracted with the current model, so this is rerun each epoch.
    """
    mismatched = labels[query_indices] != labels[positive_indices]
    if mismatched.any():
        first = int(mismatched.nonzero()[0])
        raise DataError(
            f"positive {int(positive_indices[first])} of query {int(query_indices[first])} has another label"
        )
    negatives = hardest_negatives(descriptors, labels, query_indices, n_negatives, query_chunk_size)
    return torch.cat([query_indices[:, None], positive_indices[:, None], negatives], dim=1)


class TripletMiner(nn.Module):
    """In-batch triplet mining, ``(N, D)`` embeddings, ``(N,)`` labels -> (anchor, positive, negative) indices.

    ``batch_hard``: for every anchor with a positive and a negative in the batch, its farthest positive and
    nearest negative (one triplet per anchor). ``semihard``: every triplet whose negative lies beyond the
    positive but within the margin, ``0 < d(a, n) - d(a, p) <= margin`` (``margin`` only matters here).
    Distances are those of :class:`~hetretrieval.training.losses.TripletLoss` with the same ``squared``: give
    both the same ``margin`` and ``squared``. Mined by pytorch-metric-learning's ``BatchHardMiner`` and
    ``TripletMarginMiner``.
    """

    def __init__(self, strategy: MiningStrategy = "batch_hard", margin: float = 0.1, squared: bool = True):
        super().__init__()
        if strategy not in _STRATEGIES:
            raise ConfigError(f"mining strategy must be one of {_STRATEGIES}, got {strategy!r}")
        if not margin > 0:
            raise ConfigError(f"mining margin must be positive, got {margin}")
        self.strategy = strategy
        self.margin = margin
        self.squared = squared
        distance = LpDistance(normalize_embeddings=True, p=2, power=2 if squared else 1)
        if strategy == "batch_hard":
            self.miner = BatchHardMiner(distance=distance)
        else:
            self.miner = TripletMarginMiner(margin=margin, type_of_triplets="semihard", distance=distance)

    def forward(self, embeddings: Tensor, labels: Tensor) -> TripletIndices:
        return self.miner(embeddings, labels)

    def extra_repr(self) -> str:
        return f"strategy={self.strategy!r}, margin={self.margin}, squared={self.squared}"


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Batches of ``classes_per_batch`` distinct classes x ``images_per_class`` images (P x K), as index lists.

    Each batch draws its P classes uniformly without replacement and K images of each class without
    replacement. A class with fewer than K images gives all of them, topped up with repeats drawn with
    replacement, so that small classes (common in heritage collections) still take part. An epoch has
    ``batches_per_epoch`` batches, by default as many as the dataset fills (``len(labels) // (P * K)``).
    The draw depends only on ``seed`` and the epoch given to :meth:`set_epoch`; call it at each epoch start
    (Lightning 2.6 calls ``set_epoch`` on a loader's ``sampler`` and ``batch_sampler.sampler``, not on the batch
    sampler itself). Use as ``DataLoader(dataset, batch_sampler=sampler)``.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | Tensor,
        classes_per_batch: int,
        images_per_class: int,
        batches_per_epoch: int | None = None,
        seed: int = 0,
    ):
        labels = torch.as_tensor(labels)
        _, class_of, class_sizes = torch.unique(labels, return_inverse=True, return_counts=True)
        if images_per_class < 2:
            raise ConfigError(f"images_per_class must be at least 2 to form positives, got {images_per_class}")
        if not 2 <= classes_per_batch <= len(class_sizes):
            raise ConfigError(
                f"classes_per_batch must lie in [2, {len(class_sizes)}] (classes in the data), "
                f"got {classes_per_batch}"
            )
        if batches_per_epoch is None:
            batches_per_epoch = max(1, len(labels) // (classes_per_batch * images_per_class))
        if batches_per_epoch < 1:
            raise ConfigError(f"batches_per_epoch must be at least 1, got {batches_per_epoch}")
        self.class_members = torch.argsort(class_of, stable=True).split(class_sizes.tolist())
        self.classes_per_batch = classes_per_batch
        self.images_per_class = images_per_class
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        for _ in range(self.batches_per_epoch):
            classes = torch.randperm(len(self.class_members), generator=generator)[: self.classes_per_batch]
            yield torch.cat([self._draw(self.class_members[c], generator) for c in classes.tolist()]).tolist()

    def _draw(self, members: Tensor, generator: torch.Generator) -> Tensor:
        """K images of one class: without replacement, topped up with repeats if the class is smaller."""
        shuffled = members[torch.randperm(len(members), generator=generator)]
        missing = self.images_per_class - len(members)
        if missing <= 0:
            return shuffled[: self.images_per_class]
        repeats = members[torch.randint(len(members), (missing,), generator=generator)]
        return torch.cat([shuffled, repeats])
