"""Size-exact batches of decoded images: the plan (headers read once), the reader, the sampler and the merge.

Images keep their own aspect ratio, so a batch may only hold images of one size: zero-padding would leak into
MAC/GeM/R-MAC. `ImagePlan.scan` reads every file header once (unreadable files are known, and reported, before
any model runs), `SizeBucketBatchSampler` groups images by their resized shape and deals whole batches to DDP
ranks, and every item carries its original index so that gathered results are de-duplicated and put back in
dataset order whatever the sharding.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from hetretrieval.data.datasets import ImageRecord
from hetretrieval.data.images import (
    CROP_KEY,
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    load_image,
    parse_box,
    read_image_size,
    resized_shape,
    square_crop,
)
from hetretrieval.errors import ConfigError

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]

BUCKETINGS = ("exact", "aspect")  # extraction.bucketing
# rows copied at a time by `merge_gathered` (bounds the memory of merging memory-mapped shards: 128 MiB at 2048-D)
MERGE_ROWS = 16384
# short / long side ratios of the `aspect` buckets (square to 1:3), compared in log space
ASPECT_RATIOS = (1.0, 4 / 5, 3 / 4, 2 / 3, 3 / 5, 9 / 16, 1 / 2, 2 / 5, 1 / 3)


def aspect_shape(height: int, width: int, stride: int, top: int | None = None) -> tuple[int, int]:
    """`(height, width)` -> the nearest `aspect` bucket shape, both sides multiples of `stride`.

    The longer side goes to the nearest (in log scale) of the levels `top * 2**(-k/2)`, k = 0, 1, ... (`top`:
    `max_size`, 4096 when None), each rounded to a multiple of `stride`; the shorter side to that length times
    the nearest of `ASPECT_RATIOS`, rounded to a multiple of `stride` (at least one stride). So images capped at
    `max_size` keep their longer side, and a mixed-size archive falls into a few shapes per aspect ratio.
    `(512, 384), 32, 512 -> (512, 384)`; `(300, 512), 32, 512 -> (320, 512)` (ratio 3/5).
    """
    long, short = max(height, width), min(height, width)
    top = 4096 if top is None else top
    levels = {max(stride, stride * round(top * 2 ** (-k / 2) / stride)) for k in range(32)}
    level = min(sorted(levels), key=lambda v: abs(math.log(v / long)))
    ratio = min(ASPECT_RATIOS, key=lambda r: abs(math.log(r * long / short)))
    side = max(stride, stride * round(level * ratio / stride))
    return (level, side) if height >= width else (side, level)


@dataclass(frozen=True)
class ImageSource:
    """How a record becomes pixels: the longer side capped at `max_size` (never upscaled), or, with
    `crop_size`, the centre `crop_size` square of the image whose shorter side was resized to it (training and
    mining). Files over `max_pixels` are refused unread (decompression bombs). `bucketing="aspect"` then resizes
    each image to its `aspect_shape` (sides multiples of the backbone's `stride`), so batches fill; `"exact"`
    keeps every image's own shape."""

    max_size: int | None = 800
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    crop_size: int | None = None
    bucketing: str = "exact"
    stride: int = 32

    def __post_init__(self) -> None:
        if self.bucketing not in BUCKETINGS:
            raise ConfigError(f"bucketing must be one of {', '.join(BUCKETINGS)}, got {self.bucketing!r}")
        if self.stride < 1:
            raise ConfigError(f"stride must be >= 1, got {self.stride}")
        if self.max_size is not None and self.max_size < 16:
            raise ConfigError(f"max_size must be >= 16 pixels (or null for full size), got {self.max_size}")
        if self.crop_size is not None and self.crop_size < 16:
            raise ConfigError(f"crop_size must be >= 16 pixels, got {self.crop_size}")

    def shape(self, height: int, width: int) -> tuple[int, int]:
        """The `(height, width)` an image of that displayed size is described at."""
        if self.crop_size is not None:
            return self.crop_size, self.crop_size
        if self.bucketing == "aspect":
            return aspect_shape(*resized_shape(height, width, self.max_size), self.stride, self.max_size)
        return resized_shape(height, width, self.max_size)

    def decode_size(self, height: int, width: int) -> int | None:
        """Longer side to decode at: enough for the crop's shorter side, so a 20k-pixel scan is never decoded
        in full to cut a 224-pixel crop."""
        if self.crop_size is None:
            return self.max_size
        return max(self.crop_size, math.ceil(self.crop_size * max(height, width) / min(height, width)))


@dataclass
class ImagePlan:
    """Per record: the shape it is described at (None: unreadable), its crop box, its decode size."""

    source: ImageSource
    shapes: list[tuple[int, int] | None]
    boxes: list[Box | None]
    decode_sizes: list[int | None]
    unreadable: dict[int, str] = field(default_factory=dict)

    @classmethod
    def scan(cls, records: Sequence[ImageRecord], source: ImageSource, verify: bool = False) -> ImagePlan:
        """Read every header once; a file whose header or crop box is bad is reported and never batched.
        `verify` also decodes every image once (at its decode size), for consumers that cannot skip an image
        later (training crops): truncated or corrupt pixel data is then found here too."""
        plan = cls(source, [], [], [])
        for index, record in enumerate(records):
            try:
                box = parse_box(record.metadata.get(CROP_KEY))
                height, width = read_image_size(record.path, box, max_pixels=source.max_pixels)
                plan.shapes.append(source.shape(height, width))
                plan.boxes.append(box)
                plan.decode_sizes.append(source.decode_size(height, width))
            except (ImageLoadError, ValueError) as error:
                plan.shapes.append(None)
                plan.boxes.append(None)
                plan.decode_sizes.append(None)
                plan.unreadable[index] = str(error)
                log.warning("skipping unreadable image: %s", error)
        if verify:
            files = ImageFileDataset(records, plan)
            for index in np.flatnonzero(plan.readable):
                if (error := files[int(index)]["error"]) is not None:
                    plan.shapes[index] = None
                    plan.unreadable[int(index)] = error
                    log.warning("skipping unreadable image: %s", error)
        log.info("%d images in %d size buckets", len(plan.shapes), len(set(plan.shapes) - {None}))
        return plan

    @property
    def readable(self) -> np.ndarray:
        """`(N,)` bool: records whose header was read."""
        return np.array([shape is not None for shape in self.shapes], dtype=bool)


class ImageFileDataset(Dataset):
    """Item i -> `{"index": i, "image": (3, H, W) in [0, 1] or None, "error": str or None}`, read as `plan` says.

    A file that cannot be decoded yields `image=None` and the reason, so the caller reports it as skipped
    instead of crashing a worker or silently shortening the results.
    """

    def __init__(self, records: Sequence[ImageRecord], plan: ImagePlan) -> None:
        self.paths = [record.path for record in records]
        self.plan = plan

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        plan = self.plan
        try:
            size = plan.shapes[index] if plan.source.bucketing == "aspect" and plan.source.crop_size is None else None
            image = load_image(self.paths[index], plan.decode_sizes[index], plan.boxes[index],
                               max_pixels=plan.source.max_pixels, size=size)
            if plan.source.crop_size is not None:
                image = square_crop(image, plan.source.crop_size)
            return {"index": index, "image": image, "error": None}
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

    A batch holds at most `batch_size` images and, with `batch_pixels`, at most that many pixels (images x
    height x width; always at least one image), so small images batch up while large ones, which keep a core
    busy alone, go one by one. Order is deterministic (buckets by first appearance, indices ascending), so
    batch size 1 and batched runs see the same pixels. No padding: ranks may get unequal numbers of batches,
    which prediction allows. `ids` restricts the batches to those records.
    """

    def __init__(self, shapes: Sequence[tuple[int, int] | None], batch_size: int, num_replicas: int = 1,
                 rank: int = 0, ids: Sequence[int] | None = None, batch_pixels: int | None = None) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if batch_pixels is not None and batch_pixels < 1:
            raise ConfigError(f"batch_pixels must be >= 1 or None, got {batch_pixels}")
        buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index in range(len(shapes)) if ids is None else sorted(int(i) for i in ids):
            if shapes[index] is not None:
                buckets[shapes[index]].append(index)
        batches = []
        for (height, width), bucket in buckets.items():
            size = batch_size if batch_pixels is None else max(1, min(batch_size, batch_pixels // (height * width)))
            batches += [bucket[i : i + size] for i in range(0, len(bucket), size)]
        self.batches = batches[rank::num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def merge_gathered(parts: Sequence[tuple[np.ndarray, np.ndarray]], n_images: int, head: str = "",
                   allocate: Callable[[tuple[int, int]], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-rank `(indices (n_r,), descriptors (n_r, D))` of `head` -> `descriptors (N, D)` in dataset order,
    `valid (N,)`.

    Duplicates (a sampler that pads by repeating items) keep their first occurrence; images no rank described
    stay zero with `valid` False. The result is `allocate((N, D))` (zeroed, e.g. a memory map; default float32
    zeros), filled `MERGE_ROWS` rows at a time so that memory-mapped parts are never read whole.
    """
    dims = {values.shape[1] for _, values in parts if len(values)}
    if len(dims) > 1:
        raise RuntimeError(f"ranks produced {head or 'the'} descriptors of different sizes {sorted(dims)}")
    shape = (n_images, dims.pop() if dims else 0)
    descriptors = allocate(shape) if allocate is not None else np.zeros(shape, dtype=np.float32)
    valid = np.zeros(n_images, dtype=bool)
    for indices, values in parts:
        for start in range(0, indices.size, MERGE_ROWS):
            rows = indices[start:start + MERGE_ROWS]
            fresh = _first_occurrence(rows) & ~valid[rows]
            descriptors[rows[fresh]] = values[start:start + MERGE_ROWS][fresh]
            valid[rows] = True
    return descriptors, valid


def keep_first(merged: list, items: Iterable[tuple[int, object]]) -> None:
    """Per-image values (local features) gathered from ranks into `merged` (None where none yet): each image
    keeps the first value given, as `merge_gathered` keeps each image's first descriptor row."""
    for index, value in items:
        if merged[index] is None:
            merged[index] = value


def _first_occurrence(indices: np.ndarray) -> np.ndarray:
    mask = np.zeros(indices.size, dtype=bool)
    mask[np.unique(indices, return_index=True)[1]] = True
    return mask
