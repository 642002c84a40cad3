"""Training data: a held-out split, fixed-size crops, and the two ways of forming training examples.

- :class:`ClassBalancedBatches`: P classes x K images per batch (``ClassBalancedBatchSampler``), triplets mined
  inside each batch by a ``TripletMiner``; batches ``{"images": (P*K, 3, S, S), "labels": (P*K,)}``.
- :class:`EpochTuples`: cirtorch's tuples, re-mined at the start of every epoch with the current model (random
  queries, a random positive of each, the hardest negatives of a random pool); batches
  ``{"images": (T, 2 + n_negatives, 3, S, S)}``.

Every image is cut to an ``S x S`` crop (shorter side resized to ``S``, then a random square; the centre one
when describing for mining, through the extraction engine) so that batches stack. All randomness (split, draws, crops, mining) derives from
``seed`` and the epoch number, never from global state, so runs and resumed runs are reproducible.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from hetretrieval.data.datasets import RetrievalDataset, make_dataset
from hetretrieval.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image, square_crop
from hetretrieval.errors import ConfigError, DataError
from hetretrieval.extraction.batching import ImagePlan, ImageSource
from hetretrieval.metrics.retrieval import label_codes
from hetretrieval.seeding import mix_seed
from hetretrieval.training.mining import (
    ClassBalancedBatchSampler,
    MiningStrategy,
    TripletMiner,
    mine_epoch_tuples,
)

if TYPE_CHECKING:
    from hetretrieval.training.module import FineTuningModule

log = logging.getLogger(__name__)


def holdout_split(
    dataset: RetrievalDataset, fraction: float, seed: int = 0, stratify_by: Sequence[str] = ("label", "domain"),
    query: Mapping | None = None, database: Mapping | None = None,
) -> tuple[RetrievalDataset, RetrievalDataset]:
    """Labelled records -> ``(train, validation)``, ``fraction`` of each stratum held out (at least one per
    stratum of two or more images). Strata are the distinct values of ``stratify_by`` (``label`` or metadata).

    The training set uses every image as query and database; the validation protocol takes ``query`` and
    ``database`` selectors as :func:`make_dataset` does.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"validation fraction must lie in (0, 1), got {fraction}")
    strata: dict[tuple, list[int]] = {}
    for index, record in enumerate(dataset.records):
        if record.label is not None:
            key = tuple(record.label if field == "label" else record.metadata.get(field) for field in stratify_by)
            strata.setdefault(key, []).append(index)
    rng = np.random.default_rng(seed)
    held_out = set()
    for members in strata.values():
        if len(members) >= 2:
            held_out.update(rng.permutation(members)[: max(1, round(fraction * len(members)))].tolist())
    kept = [i for members in strata.values() for i in members if i not in held_out]
    train = make_dataset(f"{dataset.name}-train", [dataset.records[i] for i in sorted(kept)])
    validation = make_dataset(f"{dataset.name}-val", [dataset.records[i] for i in sorted(held_out)], query, database)
    return train, validation


@dataclass(frozen=True)
class ClassBalancedBatches:
    """In-batch mining: ``classes_per_batch x images_per_class`` batches, ``batches_per_epoch`` per epoch
    (default: as many as the training set fills)."""

    strategy: MiningStrategy = "batch_hard"
    classes_per_batch: int = 7
    images_per_class: int = 4
    batches_per_epoch: int | None = None

    def miner(self, loss: nn.Module) -> TripletMiner:
        """The in-batch miner measuring distances as ``loss`` does (its margin; squared or not)."""
        return TripletMiner(self.strategy, margin=loss.margin, squared=getattr(loss, "squared", False))


@dataclass(frozen=True)
class EpochTuples:
    """cirtorch epoch tuples: ``n_queries`` tuples per epoch, negatives mined from ``pool_size`` random images."""

    n_queries: int = 200
    pool_size: int = 1000
    n_negatives: int = 5
    tuples_per_batch: int = 5

    def __post_init__(self) -> None:
        if min(self.n_queries, self.pool_size, self.n_negatives, self.tuples_per_batch) < 1:
            raise ConfigError(f"epoch tuples need positive sizes, got {self}")

    def miner(self, loss: nn.Module) -> None:
        """Tuples carry their own pairs: no in-batch miner."""
        return None


Sampling = ClassBalancedBatches | EpochTuples


def _crop_seed(seed: int, epoch: int, draw: int) -> int:
    return mix_seed(seed, epoch, draw)


class CroppedImages(Dataset):
    """Item ``(draw, index)`` -> ``{"image": (3, S, S), "label": code}``, the crop seeded by ``(seed, epoch,
    draw)`` so that repeats of an image in an epoch get different crops; ``index`` alone gives the centre crop.

    Images are read as ``plan`` says (decoded no larger than the crop needs, see ``ImageSource``); the plan has
    screened them at set-up, so a failure here is a file that changed since, and stops training in one line.
    """

    def __init__(self, records: Sequence, codes: Sequence[int], plan: ImagePlan, seed: int = 0,
                 epoch: int = 0) -> None:
        self.paths = [record.path for record in records]
        self.codes, self.plan, self.seed, self.epoch = list(codes), plan, seed, epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int] | int) -> dict:
        draw, index = item if isinstance(item, tuple) else (None, item)
        generator = None if draw is None else torch.Generator().manual_seed(_crop_seed(self.seed, self.epoch, draw))
        try:
            image = load_image(self.paths[index], self.plan.decode_sizes[index], self.plan.boxes[index],
                               max_pixels=self.plan.source.max_pixels)
        except ImageLoadError as error:
            raise DataError(f"training image became unreadable after set-up: {error}") from None
        return {"image": square_crop(image, self.plan.source.crop_size, generator), "label": self.codes[index]}


class NumberedBatches(Sampler[list[tuple[int, int]]]):
    """Numbers the items of a batch sampler's batches: ``[i, j, ...]`` -> ``[(draw, i), (draw + 1, j), ...]``."""

    def __init__(self, batch_sampler: Sampler[list[int]]) -> None:
        self.batch_sampler = batch_sampler

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        draw = 0
        for batch in self.batch_sampler:
            yield [(draw + position, index) for position, index in enumerate(batch)]
            draw += len(batch)


class TupleImages(Dataset):
    """Tuple ``t`` of ``tuples (T, S)`` record indices -> ``{"images": (S, 3, size, size)}``, random crops."""

    def __init__(self, images: CroppedImages, tuples: Tensor) -> None:
        self.images, self.tuples = images, tuples

    def __len__(self) -> int:
        return len(self.tuples)

    def __getitem__(self, t: int) -> dict:
        width = self.tuples.shape[1]
        return {"images": torch.stack([self.images[(t * width + s, int(i))]["image"]
                                       for s, i in enumerate(self.tuples[t])])}


def collate_crops(items: list[dict]) -> dict:
    return {"images": torch.stack([item["image"] for item in items]),
            "labels": torch.tensor([item["label"] for item in items], dtype=torch.long)}


class TrainingDataModule(pl.LightningDataModule):
    """Training batches (rebuilt every epoch: set ``reload_dataloaders_every_n_epochs=1``) and the validation
    split served by the extraction engine exactly as ``hetretrieval-eval`` serves a dataset (``val_max_size``).

    Training images are screened once (header and a full decode at crop size): an unreadable one is dropped
    from the training set, logged and listed in ``skipped``, instead of stopping training at its first crop.
    """

    def __init__(self, train_dataset: RetrievalDataset, val_dataset: RetrievalDataset | None, sampling: Sampling,
                 image_size: int = 224, val_max_size: int | None = None, batch_size: int = 32,
                 num_workers: int = 0, seed: int = 0, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        super().__init__()
        if image_size < 32:
            raise ConfigError(f"training image_size must be >= 32 pixels, got {image_size}")
        self.sampling, self.image_size, self.batch_size = sampling, image_size, batch_size
        self.num_workers, self.seed = num_workers, seed
        crop_source = ImageSource(max_size=None, max_pixels=max_pixels, crop_size=image_size)
        screened = ImagePlan.scan(train_dataset.records, crop_source, verify=True)
        self.skipped = {str(train_dataset.records[i].path): reason for i, reason in screened.unreadable.items()}
        if self.skipped:
            log.warning("training without %d unreadable image(s): %s", len(self.skipped), ", ".join(self.skipped))
            keep = [i for i in range(len(train_dataset)) if i not in screened.unreadable]
            train_dataset = make_dataset(train_dataset.name, [train_dataset.records[i] for i in keep])
            screened = ImagePlan.scan(train_dataset.records, crop_source)
        self.train_dataset, self.val_dataset, self.crop_plan = train_dataset, val_dataset, screened
        self.codes = torch.as_tensor(label_codes(train_dataset.labels))
        if (self.codes < 0).any():
            raise DataError(f"training set '{train_dataset.name}' holds unlabelled images")
        self.validation_plan = (ImagePlan.scan(val_dataset.records, ImageSource(val_max_size, max_pixels))
                                if val_dataset is not None else None)

    def crops(self, epoch: int) -> CroppedImages:
        """The training images as crops of this epoch's draw."""
        return CroppedImages(self.train_dataset.records, self.codes.tolist(), self.crop_plan, self.seed, epoch)

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        images = self.crops(epoch)
        if isinstance(self.sampling, EpochTuples):
            tuples = self.mine_tuples(epoch)
            return DataLoader(TupleImages(images, tuples), batch_size=self.sampling.tuples_per_batch,
                              shuffle=False, num_workers=self.num_workers)
        sampler = ClassBalancedBatchSampler(self.codes, self.sampling.classes_per_batch,
                                            self.sampling.images_per_class, self.sampling.batches_per_epoch,
                                            seed=self.seed)
        sampler.set_epoch(epoch)
        return DataLoader(images, batch_sampler=NumberedBatches(sampler), collate_fn=collate_crops,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []
        trainer = self.trainer
        return self.trainer.lightning_module.engine().loader(
            self.val_dataset.records, self.validation_plan, rank=trainer.global_rank, world_size=trainer.world_size)

    def mine_tuples(self, epoch: int) -> Tensor:
        """This epoch's tuples ``(n_queries, 2 + n_negatives)`` of training-set indices (see the module doc)."""
        sampling, codes = self.sampling, self.codes
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        class_sizes = torch.bincount(codes)
        eligible = torch.nonzero(class_sizes[codes] >= 2).flatten()
        if eligible.numel() == 0:
            raise DataError(f"training set '{self.train_dataset.name}' has no class with two images")
        queries = eligible[torch.randperm(len(eligible), generator=generator)[: sampling.n_queries]]
        positives = torch.stack([self._random_positive(int(q), generator) for q in queries])
        pool = torch.randperm(len(codes), generator=generator)[: sampling.pool_size]
        described = torch.unique(torch.cat([queries, positives, pool]))
        row_of = torch.full((len(codes),), -1, dtype=torch.long)
        row_of[described] = torch.arange(len(described))
        descriptors = describe_crops(self.trainer.lightning_module, self.train_dataset, self.crop_plan, described)
        rows = mine_epoch_tuples(descriptors, codes[described], row_of[queries], row_of[positives],
                                 sampling.n_negatives)
        log.info("epoch %d: mined %d tuples from %d described images", epoch, len(rows), len(described))
        return described[rows]

    def _random_positive(self, query: int, generator: torch.Generator) -> Tensor:
        others = torch.nonzero(self.codes == self.codes[query]).flatten()
        others = others[others != query]
        return others[torch.randint(len(others), (), generator=generator)]


def describe_crops(module: FineTuningModule, dataset: RetrievalDataset, plan: ImagePlan,
                   ids: Sequence[int] | Tensor) -> Tensor:
    """Centre-crop descriptors `(len(ids), D)` of `dataset.records[ids]` by the module's current weights,
    through the extraction engine (in eval mode, on the module's device), for mining and whitening fits."""
    ids = np.asarray(ids, dtype=np.int64)
    extraction = module.engine(scales=(1.0,)).extract(dataset.records, plan, ids)
    return torch.from_numpy(extraction.descriptors[module.head_name][ids])
