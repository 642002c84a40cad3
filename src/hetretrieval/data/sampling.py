"""Seeded image subsets of a dataset: what data-dependent heads learn from before extraction.

NetVLAD's k-means and whitening are fitted on a configurable image set (by default the database, as
off-the-shelf NetVLAD is learned without labels on the collection it searches).
"""

from __future__ import annotations

import numpy as np

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
