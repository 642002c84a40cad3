"""Seeded image subsets of a dataset, loaded one by one: what data-dependent heads learn from before extraction.

NetVLAD's k-means and whitening are fitted on a configurable image set (by default the database, as
off-the-shelf NetVLAD is learned without labels on the collection it searches).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from hetretrieval.data.datamodule import ImageFileDataset, RetrievalDataModule
from hetretrieval.data.datasets import RetrievalDataset
from hetretrieval.errors import ConfigError

IMAGE_SETS = ("database", "queries", "all")


def image_subset(dataset: RetrievalDataset, image_set: str = "database", max_images: int | None = None,
                 seed: int = 0) -> np.ndarray:
    """Record indices of `image_set` (database, queries or all), at most `max_images` drawn with `seed`, sorted."""
    if image_set not in IMAGE_SETS:
        raise ConfigError(f"image_set must be one of {IMAGE_SETS}, got '{image_set}'")
    ids = {"database": dataset.database_ids, "queries": dataset.query_ids,
           "all": np.arange(len(dataset))}[image_set]
    if max_images is not None and ids.size > max_images:
        ids = np.sort(np.random.default_rng(seed).choice(ids, max_images, replace=False))
    return np.asarray(ids, dtype=np.int64)


def iter_images(datamodule: RetrievalDataModule, ids: np.ndarray) -> Iterator[torch.Tensor]:
    """Yield records `ids` of a set-up datamodule as `(1, 3, H, W)` images in [0, 1], loaded as for extraction
    (same size cap and crop boxes); images it found unreadable, or that fail to decode, are skipped."""
    files = ImageFileDataset([r.path for r in datamodule.dataset.records], datamodule.max_size, datamodule.boxes)
    for index in ids:
        if datamodule.shapes[index] is not None and (item := files[int(index)])["image"] is not None:
            yield item["image"][None]
