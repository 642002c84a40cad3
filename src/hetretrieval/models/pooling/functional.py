"""Global pooling of a conv feature map into one descriptor: pure functions, shapes in the docstrings.

`x` is always a non-negative (post-ReLU) feature map `(B, C, H, W)`; every descriptor is L2-normalised so that
the inner product is the cosine similarity the index searches with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def l2n(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """L2-normalise the last dimension: `(..., D) -> (..., D)`."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def mac(x: torch.Tensor) -> torch.Tensor:
    """Maximum activation of convolutions (Tolias et al.): `(B, C, H, W) -> (B, C)`."""
    return x.amax(dim=(-2, -1))


def spoc(x: torch.Tensor) -> torch.Tensor:
    """Sum-pooled convolutional features (Babenko & Lempitsky), as the mean: `(B, C, H, W) -> (B, C)`."""
    return x.mean(dim=(-2, -1))


def gem(x: torch.Tensor, p: torch.Tensor | float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean (Radenović et al.): `(mean(clamp(x, eps)^p))^(1/p)`, `(B, C, H, W) -> (B, C)`.

    p = 1 is SPoC, p -> inf tends to MAC; the clamp keeps the power and its gradient finite at zeros.
    """
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def rmac_regions(height: int, width: int, levels: int = 3, overlap: float = 0.4) -> list[tuple[int, int, int, int]]:
    """R-MAC region grid (Tolias et al., ICLR 2016) on an `height x width` map, as `(top, left, h, w)` boxes.

    Level l = 1..L has square regions of side `floor(2 * min(H, W) / (l + 1))`, so level 1 spans the short side.
    Along the long side, `l + e` regions are placed, the extra count `e` (1..6, 0 for a square map) chosen once
    so that neighbouring level-1 regions overlap as close as possible to `overlap` (40%). Starts are
    `floor(i * (length - side) / (n - 1))`, as in the authors' MATLAB code; unlike cirtorch, no extra whole-map
    region is added.
    """
    short, long = min(height, width), max(height, width)
    steps = torch.arange(2, 8, dtype=torch.float64)  # candidate numbers of level-1 regions along the long side
    spacing = (long - short) / (steps - 1)
    extra = int(torch.argmin(((short**2 - short * spacing) / short**2 - overlap).abs())) + 1 if long > short else 0
    extra_h, extra_w = (extra, 0) if height > width else (0, extra)

    regions = []
    for level in range(1, levels + 1):
        side = math.floor(2 * short / (level + 1))
        if side < 1:
            continue
        tops = _region_starts(height, side, level + extra_h)
        lefts = _region_starts(width, side, level + extra_w)
        regions.extend((top, left, side, side) for top in tops for left in lefts)
    return regions


def _region_starts(length: int, side: int, count: int) -> list[int]:
    """Starts of `count` windows of `side` spread evenly over `[0, length)`: `floor(i * (length - side) / (count - 1))`."""
    if count == 1:
        return [0]
    step = (length - side) / (count - 1)
    return [math.floor(i * step) for i in range(count)]


def rmac(x: torch.Tensor, levels: int = 3, overlap: float = 0.4) -> torch.Tensor:
    """Regional MAC: max-pool each region, L2-normalise, sum, L2-normalise: `(B, C, H, W) -> (B, C)`."""
    total = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
    for top, left, h, w in rmac_regions(x.shape[-2], x.shape[-1], levels, overlap):
        total = total + l2n(mac(x[..., top : top + h, left : left + w]))
    return l2n(total)


def aggregate_scales(descriptors: list[torch.Tensor]) -> torch.Tensor:
    """Multi-scale descriptor: the mean of per-scale L2-normalised descriptors, re-normalised. `S x (B, D) -> (B, D)`."""
    return l2n(torch.stack([l2n(d) for d in descriptors]).mean(dim=0))


def resize_to_scale(images: torch.Tensor, scale: float) -> torch.Tensor:
    """Bilinear (antialiased) rescale of a batch: `(B, 3, H, W) -> (B, 3, round(sH), round(sW))`."""
    if scale == 1.0:
        return images
    size = (max(1, round(images.shape[-2] * scale)), max(1, round(images.shape[-1] * scale)))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
