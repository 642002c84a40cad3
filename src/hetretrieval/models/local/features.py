"""Local features of one image (keypoints, descriptors, scores) and their storage in one `.npz` file.

Extraction is the slow step of local matching, so a collection's features are saved once and every later
matching / verification / analysis run loads them instead of re-extracting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hetretrieval.errors import DataError


@dataclass(frozen=True, eq=False)
class LocalFeatures:
    """Local features of one image.

    Attributes:
        keypoints: `(N, 2)` float32, `(x, y)` in pixels of the original (un-resized) image.
        descriptors: `(N, D)` float32 L2-normalised, or `(N, D)` uint8 packed binary (`8 * D` bits, e.g. ORB).
        scores: `(N,)` float32 detector response or attention score (higher is stronger).
        image_size: `(H, W)` of the original image.
    """

    keypoints: np.ndarray
    descriptors: np.ndarray
    scores: np.ndarray
    image_size: tuple[int, int]

    def __post_init__(self) -> None:
        n = len(self.keypoints)
        if self.keypoints.shape != (n, 2):
            raise ValueError(f"keypoints must be (N, 2), got {self.keypoints.shape}")
        if self.descriptors.ndim != 2 or len(self.descriptors) != n:
            raise ValueError(f"descriptors must be ({n}, D), got {self.descriptors.shape}")
        if self.descriptors.dtype not in (np.float32, np.uint8):
            raise ValueError(
                f"descriptors must be float32 or packed-binary uint8, got {self.descriptors.dtype}"
            )
        if self.scores.shape != (n,):
            raise ValueError(f"scores must be ({n},), got {self.scores.shape}")
        if len(self.image_size) != 2:
            raise ValueError(f"image_size must be (H, W), got {self.image_size}")

    def __len__(self) -> int:
        return len(self.keypoints)

    @property
    def is_binary(self) -> bool:
        """Whether descriptors are packed bits (Hamming distance) rather than unit float vectors."""
        return self.descriptors.dtype == np.uint8


def save_local_features(path: str | Path, features: Sequence[LocalFeatures]) -> None:
    """Write the features of many images to one `.npz`: arrays concatenated over images plus offsets.

    All images must share the descriptor dtype and dimension (one extractor per file).
    """
    if not features:
        raise ValueError("no local features to save")
    kinds = {(f.descriptors.dtype, f.descriptors.shape[1]) for f in features}
    if len(kinds) != 1:
        raise ValueError(
            f"all images must share one descriptor dtype and dimension, got {sorted(map(str, kinds))}"
        )
    counts = np.array([len(f) for f in features], dtype=np.int64)
    np.savez(
        path,
        keypoints=np.concatenate([f.keypoints for f in features]).astype(np.float32),
        descriptors=np.concatenate([f.descriptors for f in features]),
        scores=np.concatenate([f.scores for f in features]).astype(np.float32),
        offsets=np.concatenate([[0], np.cumsum(counts)]),
        image_sizes=np.array([f.image_size for f in features], dtype=np.int64),
    )


def load_local_features(path: str | Path) -> list[LocalFeatures]:
    """Read the per-image features written by `save_local_features`, in the saved order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"local features file not found: {path}")
    try:
        with np.load(path) as arrays:
            keypoints, descriptors, scores = arrays["keypoints"], arrays["descriptors"], arrays["scores"]
            offsets, image_sizes = arrays["offsets"], arrays["image_sizes"]
    except (KeyError, ValueError, OSError) as error:
        raise DataError(f"malformed local features file {path}: {error}") from error
    if len(offsets) != len(image_sizes) + 1 or offsets[-1] != len(keypoints):
        raise DataError(f"malformed local features file {path}: offsets do not match the stored arrays")
    return [
        LocalFeatures(
            keypoints=keypoints[start:end],
            descriptors=descriptors[start:end],
            scores=scores[start:end],
            image_size=(int(height), int(width)),
        )
        for start, end, (height, width) in zip(offsets[:-1], offsets[1:], image_sizes, strict=True)
    ]
