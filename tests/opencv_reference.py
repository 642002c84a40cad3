"""OpenCV's RANSAC on one pair: the reference the batched torch RANSAC is tested and benchmarked against."""

from __future__ import annotations

import numpy as np

from hetretrieval.errors import ConfigError
from hetretrieval.models.local.ransac import MINIMAL_SAMPLE_SIZE


def ransac_opencv(
    src: np.ndarray,
    dst: np.ndarray,
    model: str = "affine",
    threshold: float = 5.0,
    iterations: int = 1000,
    confidence: float = 0.999,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference RANSAC on one pair with OpenCV: `(M, 2)` src / dst pixels -> inliers `(M,)`, model `(3, 3)`.

    OpenCV scores the same transfer error against `threshold` and stops early once `confidence` is reached.
    """
    import cv2

    if threshold <= 0 or iterations < 1:
        raise ConfigError(f"RANSAC needs threshold > 0 and iterations >= 1, got {threshold} and {iterations}")
    if not 0 < confidence < 1:
        raise ConfigError(f"OpenCV RANSAC needs 0 < confidence < 1, got {confidence}")
    inliers, no_model = np.zeros(len(src), dtype=bool), np.zeros((3, 3))
    if len(src) < MINIMAL_SAMPLE_SIZE[model]:
        return inliers, no_model
    src, dst = np.ascontiguousarray(src, dtype=np.float32), np.ascontiguousarray(dst, dtype=np.float32)
    if model == "affine":
        affine, mask = cv2.estimateAffine2D(
            src,
            dst,
            method=cv2.RANSAC,
            ransacReprojThreshold=threshold,
            maxIters=iterations,
            confidence=confidence,
        )
        matrix = None if affine is None else np.vstack([affine, [0, 0, 1]])
    else:
        matrix, mask = cv2.findHomography(
            src,
            dst,
            method=cv2.RANSAC,
            ransacReprojThreshold=threshold,
            maxIters=iterations,
            confidence=confidence,
        )
    if matrix is None or mask is None:
        return inliers, no_model
    return mask.ravel().astype(bool), matrix.astype(np.float64)
