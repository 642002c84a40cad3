"""ORB keypoints and binary descriptors (OpenCV): the hand-crafted local baseline, no weights needed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hetretrieval.errors import ConfigError
from hetretrieval.models.local.features import LocalFeatures

ORB_DESCRIPTOR_BYTES = 32  # 256-bit rBRIEF


def to_gray_uint8(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """`(H, W, 3)` RGB / `(H, W)` gray uint8 array or `(3, H, W)` float tensor in [0, 1] -> `(H, W)` uint8."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(
                f"a tensor image must be (3, H, W) float in [0, 1], got {tuple(image.shape)} {image.dtype}"
            )
        image = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(
            f"an array image must be (H, W, 3) RGB or (H, W) gray uint8, got {image.shape} {image.dtype}"
        )
    if image.ndim == 2:
        return image
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)


def extract_orb(
    image: np.ndarray | torch.Tensor,
    n_features: int = 1000,
    scale_factor: float = 1.2,
    n_levels: int = 8,
    fast_threshold: int = 20,
) -> LocalFeatures:
    """ORB on one image -> `LocalFeatures` with `(N, 32)` uint8 packed descriptors, `N <= n_features`.

    `image` as in `to_gray_uint8`. Scores are the FAST/Harris responses; keypoints are in the input's pixels.
    """
    import cv2

    if n_features < 1 or n_levels < 1 or scale_factor <= 1.0 or fast_threshold < 1:
        raise ConfigError(
            "ORB needs n_features >= 1, n_levels >= 1, scale_factor > 1 and fast_threshold >= 1, got "
            f"{n_features}, {n_levels}, {scale_factor}, {fast_threshold}"
        )
    gray = to_gray_uint8(image)
    orb = cv2.ORB_create(
        nfeatures=n_features, scaleFactor=scale_factor, nlevels=n_levels, fastThreshold=fast_threshold
    )
    keypoints, descriptors = orb.detectAndCompute(gray, None)
    if descriptors is None:  # no keypoint survived (flat or tiny image)
        descriptors = np.zeros((0, ORB_DESCRIPTOR_BYTES), dtype=np.uint8)
    return LocalFeatures(
        keypoints=np.array([kp.pt for kp in keypoints], dtype=np.float32).reshape(-1, 2),
        descriptors=descriptors,
        scores=np.array([kp.response for kp in keypoints], dtype=np.float32),
        image_size=gray.shape,
    )


@dataclass(frozen=True)
class OrbExtractor:
    """Configured ORB (what a Hydra `_target_` instantiates); calling it runs `extract_orb`."""

    name = "orb"  # descriptor name in run outputs (a class attribute, not a field)
    n_features: int = 1000
    scale_factor: float = 1.2
    n_levels: int = 8
    fast_threshold: int = 20

    def __call__(self, image: np.ndarray | torch.Tensor) -> LocalFeatures:
        return extract_orb(image, self.n_features, self.scale_factor, self.n_levels, self.fast_threshold)
