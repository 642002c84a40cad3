"""Batched, size-exact image loading for descriptor extraction.

Images keep their own aspect ratio, so a batch may only hold images of one size: zero-padding would leak into
MAC/GeM/R-MAC. `SizeBucketBatchSampler` groups images by their (resized) shape, read from file headers, and
shards whole batches across DDP ranks; every item carries its original index so gathered descriptors are
de-duplicated and put back in dataset order whatever the sharding.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from hetretrieval.data.datasets import RetrievalDataset
from hetretrieval.data.images import (
    CROP_KEY,
    ImageLoadError,
    load_image,
    parse_box,
    read_image_size,
    resized_shape,
)
from hetretrieval.errors import ConfigError

log = logging.getLogger(__name__)


class ImageFileDataset(Dataset):
    """Loads `records[i]` as `{"index": i, "image": (3, H, W) or None, "error": str or None}`.

    A file that cannot be decoded yields `image=None` and the reason, so the caller can report it as skipped
    instead of crashing a worker or silently shortening the results. `boxes[i]`, when given and not None,
    crops image i (`load_image`'s `box`).
    """

    def __init__(self, paths: Sequence, max_size: int | None, boxes: Sequence | None = None) -> None:
        self.paths = list(paths)
        self.max_size = max_size
        self.boxes = list(boxes) if boxes is not None else [None] * len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        try:
            return {"index": index, "image": load_image(self.paths[index], self.max_size, self.boxes[index]),
                    "error": None}
        except ImageLoadError as error:
            return {"index": index, "image": None, "error": str(error)}


def collate_same_size(items: list[dict]) -> dict:
    """Stack the decoded images of one size bucket; failures travel separately as `(index, reason)` pairs."""
    loaded = [item for item in items if item["image"] is not None]
    shapes = {tuple(item["image"].shape) for item in loaded}
    if len(shapes) > 1:
        raise RuntimeError(f"a size bucket mixed image shapes {sorted(shapes)}: header and decoded sizes differ")
    return {
        "index": torch.tensor([item["index"] for item in loaded], dtype=torch.long),
        "images": torch.stack([item["image"] for item in loaded]) if loaded else torch.empty(0, 3, 1, 1),
        "failed": [(item["index"], item["error"]) for item in items if item["image"] is None],
    }


class SizeBucketBatchSampler(Sampler[list[int]]):
    """Batches of indices whose images share one shape; batches dealt round-robin to `num_replicas` ranks.

    Order is deterministic (buckets by first appearance, indices ascending), so batch size 1 and batched runs
    see the same pixels. No padding: ranks may get unequal numbers of batches, which prediction allows.
    """

    def __init__(self, shapes: Sequence[tuple[int, int] | None], batch_size: int,
                 num_replicas: int = 1, rank: int = 0) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, shape in enumerate(shapes):
            if shape is not None:
                buckets[shape].append(index)
        batches = [bucket[i : i + batch_size] for bucket in buckets.values() for i in range(0, len(bucket), batch_size)]
        self.batches = batches[rank::num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class RetrievalDataModule(pl.LightningDataModule):
    """Serves every image of a `RetrievalDataset` once, in size buckets, for `trainer.predict`.

    Images whose header cannot be read are known before extraction and reported in `unreadable`; images that
    fail to decode later are reported by the batches themselves (`failed`).
    """

    def __init__(self, dataset: RetrievalDataset, max_size: int | None = 800, batch_size: int = 16,
                 num_workers: int = 0) -> None:
        super().__init__()
        if max_size is not None and max_size < 16:
            raise ConfigError(f"max_size must be >= 16 pixels (or null for full size), got {max_size}")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.max_size = max_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shapes: list[tuple[int, int] | None] | None = None
        self.boxes: list[tuple[float, float, float, float] | None] = []
        self.unreadable: dict[int, str] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.shapes is not None:
            return
        self.shapes, self.boxes = [], []
        for index, record in enumerate(self.dataset.records):
            try:
                box = parse_box(record.metadata.get(CROP_KEY))
                self.shapes.append(resized_shape(*read_image_size(record.path, box), self.max_size))
                self.boxes.append(box)
            except (ImageLoadError, ValueError) as error:  # never batched: its shape is None
                self.shapes.append(None)
                self.boxes.append(None)
                self.unreadable[index] = str(error)
                log.warning("skipping unreadable image: %s", error)
        log.info("%d images in %d size buckets", len(self.shapes), len(set(self.shapes) - {None}))

    def predict_dataloader(self) -> DataLoader:
        trainer = self.trainer
        sampler = SizeBucketBatchSampler(
            self.shapes, self.batch_size,
            num_replicas=trainer.world_size if trainer else 1, rank=trainer.global_rank if trainer else 0,
        )
        return DataLoader(
            ImageFileDataset([record.path for record in self.dataset.records], self.max_size, self.boxes),
            batch_sampler=sampler, collate_fn=collate_same_size, num_workers=self.num_workers,
            persistent_workers=False, pin_memory=torch.cuda.is_available(),
        )


def merge_gathered(parts: Sequence[tuple[np.ndarray, np.ndarray]], n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-rank `(indices (n_r,), descriptors (n_r, D))` -> `descriptors (N, D)` in dataset order, `valid (N,)`.

    Duplicates (a sampler that pads by repeating items) keep their first occurrence; images no rank described
    stay zero with `valid` False.
    """
    dims = {p[1].shape[1] for p in parts if p[1].size}
    if len(dims) > 1:
        raise RuntimeError(f"ranks produced descriptors of different sizes {sorted(dims)}")
    descriptors = np.zeros((n_images, dims.pop() if dims else 0), dtype=np.float32)
    valid = np.zeros(n_images, dtype=bool)
    for indices, values in parts:
        fresh = _first_occurrence(indices) & ~valid[indices]
        descriptors[indices[fresh]] = values[fresh]
        valid[indices[fresh]] = True
    return descriptors, valid


def _first_occurrence(indices: np.ndarray) -> np.ndarray:
    mask = np.zeros(indices.size, dtype=bool)
    mask[np.unique(indices, return_index=True)[1]] = True
    return mask
