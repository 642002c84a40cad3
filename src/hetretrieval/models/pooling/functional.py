"""Global pooling of a conv feature map into one descriptor: pure functions, shapes in the docstrings.

`x` is always a non-negative (post-ReLU) feature map `(B, C, H, W)`; every descriptor is L2-normalised so that
the inner product is the cosine similarity the index searches with.
"""

from __future__ import annotations

from fractions import Fraction

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

    Level l = 1..L has square regions of side `floor(2 * min(H, W) / (l + 1))`, so level 1 spans the short side
    (a level whose side would be 0, e.g. l >= 2 on a 1-row map, is left out). Along the long side, `l + e`
    regions are placed, the extra count `e` (1..6, 0 for a square map) chosen once so that neighbouring level-1
    regions overlap as close as possible to `overlap` (40%): `n = e + 1` level-1 regions have the overlap
    `1 - (long - short) / ((n - 1) * short)`. Starts are `floor(i * (length - side) / (n - 1))`, as in the
    authors' MATLAB code; unlike cirtorch, no extra whole-map region is added.

    Everything is exact rational arithmetic (`overlap` is read as the decimal it is written as: 0.4 = 2/5),
    so no start is one pixel off where a float product lands just below an integer. Tie rule: when two counts
    are exactly as close to `overlap` (e.g. 5x9 and 10x18 maps, where 2 and 3 level-1 regions overlap by 20%
    and 60%), the smaller count is taken: the first minimum, which is what cirtorch's float32 computation
    picks there (float64 rounding picks either, depending on the map).
    """
    short, long = min(height, width), max(height, width)
    extra = _extra_regions(short, long, Fraction(str(overlap))) if long > short else 0
    extra_h, extra_w = (extra, 0) if height > width else (0, extra)

    regions = []
    for level in range(1, levels + 1):
        side = 2 * short // (level + 1)
        if side < 1:
            continue
        tops = _region_starts(height, side, level + extra_h)
        lefts = _region_starts(width, side, level + extra_w)
        regions.extend((top, left, side, side) for top in tops for left in lefts)
    return regions


def _extra_regions(short: int, long: int, overlap: Fraction) -> int:
    """The extra count `e = n - 1` of level-1 regions along the long side (`n` in 2..7): `n` whose overlap
    `1 - (long - short) / ((n - 1) * short)` is nearest `overlap`, the smallest `n` on an exact tie."""
    errors = [abs(1 - Fraction(long - short, (n - 1) * short) - overlap) for n in range(2, 8)]
    return errors.index(min(errors)) + 1


def _region_starts(length: int, side: int, count: int) -> list[int]:
    """Starts of `count` windows of `side` spread evenly over `[0, length)`: `floor(i * (length - side) / (count - 1))`,
    computed exactly in integers."""
    if count == 1:
        return [0]
    return [i * (length - side) // (count - 1) for i in range(count)]


def rmac(x: torch.Tensor, levels: int = 3, overlap: float = 0.4) -> torch.Tensor:
    """Regional MAC: max-pool each region, L2-normalise, sum, L2-normalise: `(B, C, H, W) -> (B, C)`."""
    total = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
    for top, left, h, w in rmac_regions(x.shape[-2], x.shape[-1], levels, overlap):
        total = total + l2n(mac(x[..., top : top + h, left : left + w]))
    return l2n(total)


def aggregate_scales(descriptors: list[torch.Tensor]) -> torch.Tensor:
    """Multi-scale descriptor: the mean of per-scale L2-normalised descriptors, re-normalised. `S x (B, D) -> (B, D)`."""
    return l2n(torch.stack([l2n(d) for d in descriptors]).mean(dim=0))


def power_mean_scales(descriptors: list[torch.Tensor], p: float = 1.0) -> torch.Tensor:
    """cirtorch's multi-scale descriptor (`extract_ms` with `msp`): the power mean of the per-scale
    L2-normalised descriptors, re-normalised, `l2n((mean_s d_s^p)^(1/p))`. `S x (B, D) -> (B, D)`.

    cirtorch takes `p` = GeM's exponent and 1 for every other pooling; `p = 1` is `aggregate_scales`. A
    non-integer `p` needs non-negative descriptors (GeM's are).
    """
    if p == 1.0:
        return aggregate_scales(descriptors)
    return l2n(torch.stack([l2n(d) for d in descriptors]).pow(p).mean(dim=0).pow(1.0 / p))


def resize_to_scale(images: torch.Tensor, scale: float) -> torch.Tensor:
    """Bilinear (antialiased) rescale of a batch: `(B, 3, H, W) -> (B, 3, round(sH), round(sW))`."""
    if scale == 1.0:
        return images
    size = (max(1, round(images.shape[-2] * scale)), max(1, round(images.shape[-1] * scale)))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
