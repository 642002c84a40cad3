"""DELF-style keypoints: receptive fields, feature locations, selection over an image pyramid.

Every position of a conv feature map is a local descriptor whose location is the centre of its receptive field
in the input image (Noh et al., ICCV 2017). Coordinates follow OpenCV (and `LocalFeatures`): `(x, y)` in
pixels of the original image, pixel `(i, j)` centred at `(x=j, y=i)`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hetretrieval.errors import ConfigError
from hetretrieval.models.local.features import LocalFeatures

DELF_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)  # Noh et al.'s pyramid: powers of sqrt(2)


@dataclass(frozen=True)
class ReceptiveField:
    """Where each unit of a feature map looks in the input, per axis as `(x, y)`.

    Attributes:
        size: extent in input pixels of one unit's receptive field.
        stride: input pixels between the receptive fields of neighbouring units (the jump).
        offset: centre of unit `(0, 0)`'s receptive field in input pixel coordinates (may be negative or
            half-integer); unit `(row, col)` is centred at `offset + stride * (col, row)`.
    """

    size: tuple[int, int]
    stride: tuple[int, int]
    offset: tuple[float, float]


def receptive_field(module: nn.Module, in_channels: int = 3, probe_size: int = 512) -> ReceptiveField:
    """Measure the receptive field of any module mapping `(1, in_channels, H, W) -> (1, C, h, w)`.

    Method: NaN propagation. NaN is absorbing for every arithmetic op (sum, product, max, ReLU, clamp,
    sigmoid), so after filling a set of input rows with NaN an output unit is NaN exactly when its
    computation reads one of those rows. Filling the rows `< t` (resp. `>= t`) with NaN is monotone in `t`,
    so a binary search on `t` finds the first (last) input row a unit depends on: the receptive field's
    bounds, exact whatever the graph (residual branches, "same" padding, max pooling; for dilated convs the
    bounds' hull). Two neighbouring units near the centre give the stride, and their centres extrapolated to
    unit 0 the offset. Each axis is measured on a thin probe (`probe_size` along it, a few pixels across),
    since a conv's support along one axis does not depend on the other axis's size. The weights stay as they
    are, on a CPU copy in eval mode (so batch-norm does not mix the batch); NNPACK, whose Winograd/FFT
    convolutions could spread a NaN beyond its true support, is disabled
    (oneDNN's direct convolutions do not).

    Limits: modules with global context (squeeze-excitation, self-attention, global pooling) depend on every
    pixel; then the field reaches the probe's border and this raises `ConfigError`. For TF-"same" padding
    (timm `tf_*` models) the padding, hence the offset, varies with the input size modulo the stride (by up to
    `stride - 1` pixels); the value returned is the one for an input of `probe_size` pixels, and
    `ReceptiveFieldBySize` gives the field for every input size.

    Args:
        module: maps an image batch to a feature map; a list/tuple output (timm `features_only`) uses its
            last map.
        in_channels: channels of the probe image.
        probe_size: probe length along the measured axis; must exceed the receptive field size.
    """
    probe_module = _probe_copy(module)
    with _probing():
        x_size, x_stride, x_offset = _receptive_field_along(probe_module, in_channels, probe_size, -1)
        y_size, y_stride, y_offset = _receptive_field_along(probe_module, in_channels, probe_size, -2)
    return ReceptiveField(size=(x_size, y_size), stride=(x_stride, y_stride), offset=(x_offset, y_offset))


class ReceptiveFieldBySize:
    """`(height, width) -> ReceptiveField` of a module for an input of that size: measured, cached per size class.

    A unit's receptive-field size and the stride do not depend on the input size, but its offset does under
    TF-"same" padding (timm `tf_*` models, e.g. the default `tf_efficientnet_lite0`): a layer of kernel `k`
    and stride `s` on an input of length `x` pads `max(k - s, 0)` pixels if `x = 0 (mod s)`, else
    `max(k - (x mod s), 0)`, the extra pixel of an odd total on the far side, so the offset changes with the
    length modulo the total stride `S` (tf_efficientnet_lite0's stage 3, `S = 16`: 15 px at lengths
    `= 0 (mod 16)`, then 0, 1, ..., 14 px at lengths `= 1, ..., 15`). Through a chain of convolutions and
    poolings, each layer's input length modulo its own stride is fixed by the input length modulo `S`, so
    so is the offset: each axis is measured by `receptive_field`'s NaN probe once per residue modulo `S`, on
    a probe of the smallest length `>= probe_size` with that residue, and cached. `base` is the field at
    `probe_size`, measured on construction; other residues are measured when first asked for (a fraction of
    a second each, at most `S` per axis).
    """

    def __init__(self, module: nn.Module, in_channels: int = 3, probe_size: int = 512) -> None:
        self._module = _probe_copy(module)
        self._in_channels, self._probe_size = in_channels, probe_size
        with _probing():
            along = [_receptive_field_along(self._module, in_channels, probe_size, axis) for axis in (-1, -2)]
        (x_size, x_stride, x_offset), (y_size, y_stride, y_offset) = along
        self.base = ReceptiveField(size=(x_size, y_size), stride=(x_stride, y_stride), offset=(x_offset, y_offset))
        self._offsets = {(-1, probe_size % x_stride): x_offset, (-2, probe_size % y_stride): y_offset}

    def __call__(self, height: int, width: int) -> ReceptiveField:
        return ReceptiveField(self.base.size, self.base.stride, (self.offset(-1, width), self.offset(-2, height)))

    def offset(self, axis: int, length: int) -> float:
        """Centre of unit 0's field along `axis` (-1: x, -2: y) for an input `length` pixels long."""
        index = 0 if axis == -1 else 1
        size, stride = self.base.size[index], self.base.stride[index]
        key = (axis, length % stride)
        if key not in self._offsets:
            probe_size = self._probe_size + (length - self._probe_size) % stride
            with _probing():
                measured = _receptive_field_along(self._module, self._in_channels, probe_size, axis)
            if measured[:2] != (size, stride):
                raise ConfigError(f"the receptive field along axis {axis} changes with the input length "
                                  f"({measured[:2]} at {probe_size} px, {(size, stride)} at {self._probe_size})")
            self._offsets[key] = measured[2]
        return self._offsets[key]


def _probe_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).cpu().float().eval()


@contextmanager
def _probing() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny probes: thread synchronisation would dominate (40x on a busy host)
    try:
        with torch.no_grad(), torch.backends.nnpack.flags(enabled=False):
            yield
    finally:
        torch.set_num_threads(threads)


def _feature_map(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    output = module(images)
    return output[-1] if isinstance(output, list | tuple) else output


def _thin_probe(module: nn.Module, in_channels: int, probe_size: int, axis: int) -> torch.Tensor:
    """The cheapest zero probe, `probe_size` long along `axis`, on which the module gives a non-empty map."""
    for thin_side in (8, 16, 32, 64, 128, 256, 512, 1024):
        shape = [1, in_channels, thin_side, thin_side]
        shape[axis] = probe_size
        probe = torch.zeros(shape)
        try:
            if _feature_map(module, probe).shape[-2:].numel() > 0:
                return probe
        except RuntimeError:  # input smaller than a kernel: try a wider probe
            continue
    raise ConfigError(f"the module gives no output on a {probe_size}-pixel probe: increase probe_size")


def _receptive_field_along(
    module: nn.Module, in_channels: int, probe_size: int, axis: int
) -> tuple[int, int, float]:
    """`(size, stride, offset)` along `axis` (-1: x, -2: y), see `receptive_field`."""
    probe = _thin_probe(module, in_channels, probe_size, axis)
    n_units = _feature_map(module, probe).shape[axis]
    if n_units < 2:
        raise ConfigError(
            f"probe_size={probe_size} gives fewer than 2 feature-map units: increase probe_size"
        )
    positions = torch.arange(probe_size).view([-1] + [1] * (-axis - 1))
    # Four searches in lockstep, one batched forward per step: (unit, whether the rows below t are NaN).
    # first row of u: t - 1 for the smallest t whose rows < t reach u; last row: largest t whose rows >= t do.
    searches = [
        (n_units // 2 - 1, True),
        (n_units // 2, True),
        (n_units // 2 - 1, False),
        (n_units // 2, False),
    ]
    low = [1 if below else 0 for _, below in searches]
    high = [probe_size if below else probe_size - 1 for _, below in searches]
    while low != high:
        middle = [
            (lo + hi + (not below)) // 2 for lo, hi, (_, below) in zip(low, high, searches, strict=True)
        ]
        masks = [
            positions < t if below else positions >= t for t, (_, below) in zip(middle, searches, strict=True)
        ]
        batch = torch.stack([probe[0].masked_fill(mask, float("nan")) for mask in masks])
        output = _feature_map(module, batch).movedim(axis, 1)
        for i, (unit, below) in enumerate(searches):
            reached = bool(output[i, unit].isnan().any())
            if below:
                low[i], high[i] = (low[i], middle[i]) if reached else (middle[i] + 1, high[i])
            else:
                low[i], high[i] = (middle[i], high[i]) if reached else (low[i], middle[i] - 1)
    first, last = [t - 1 for t in low[:2]], low[2:]

    if min(first) <= 0 or max(last) >= probe_size - 1:
        raise ConfigError(
            f"the receptive field reaches the border of a {probe_size}-pixel probe: increase probe_size "
            "(or the module has global context, e.g. squeeze-excitation, and no local receptive field)"
        )
    sizes = [b - a + 1 for a, b in zip(first, last, strict=True)]
    stride = first[1] - first[0]
    if sizes[0] != sizes[1] or stride != last[1] - last[0] or stride < 1:
        raise ConfigError(f"the module is not translation-equivariant along axis {axis}: {first=} {last=}")
    offset = (first[0] + last[0]) / 2 - stride * searches[0][0]
    return sizes[0], stride, offset


def feature_locations(height: int, width: int, rf: ReceptiveField) -> torch.Tensor:
    """`(h, w)` feature-map grid -> `(h * w, 2)` float32 `(x, y)` receptive-field centres, row-major order."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    grid = torch.stack([cols.flatten(), rows.flatten()], dim=1).float()
    return torch.tensor(rf.offset) + torch.tensor(rf.stride, dtype=torch.float32) * grid


def _strongest(scores: torch.Tensor, top_n: int, threshold: float | None) -> torch.Tensor:
    """`(N,)` scores -> indices of the at most `top_n` highest scores `>= threshold`, by decreasing score."""
    order = scores.argsort(descending=True, stable=True)[:top_n]
    return order if threshold is None else order[scores[order] >= threshold]


def select_keypoints(
    features: torch.Tensor,
    scores: torch.Tensor,
    rf: ReceptiveField,
    top_n: int,
    threshold: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the `top_n` best-scoring feature-map positions with score `>= threshold` (no threshold if None).

    `(C, h, w)` features, `(h, w)` scores -> `(n, 2)` `(x, y)` locations in the map's input pixels,
    `(n, C)` descriptors (as they are, not normalised), `(n,)` scores; sorted by decreasing score.
    """
    if top_n < 1:
        raise ConfigError(f"top_n must be >= 1, got {top_n}")
    channels, height, width = features.shape
    if scores.shape != (height, width):
        raise ValueError(f"scores must be ({height}, {width}) like the features, got {tuple(scores.shape)}")
    flat_scores = scores.flatten()
    keep = _strongest(flat_scores, top_n, threshold)
    locations = feature_locations(height, width, rf).to(features.device)
    return locations[keep], features.reshape(channels, -1).T[keep], flat_scores[keep]


def extract_local_features(
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    scorer: Callable[[torch.Tensor], torch.Tensor],
    rf: ReceptiveField | Callable[[int, int], ReceptiveField],
    scales: Sequence[float] = DELF_SCALES,
    top_n: int = 1000,
    threshold: float | None = None,
) -> LocalFeatures:
    """DELF extraction: the `top_n` best-scoring local features of one image over an image pyramid.

    Each scale resizes the `(3, H, W)` image (bilinear, antialiased) to `round(s * H) x round(s * W)`, maps
    it through `feature_fn` `(1, 3, h', w') -> (1, C, h, w)` and `scorer` `(1, C, h, w) -> (1, h, w)`, keeps
    that scale's `top_n` positions with score `>= threshold`, locates them by the receptive field `rf` (or,
    when `rf` is a callable such as `ReceptiveFieldBySize`, by `rf(h', w')`, the field of that scale's input
    size: its offset varies with the size under TF-"same" padding), and maps their receptive-field centres back to
    the original image by the exact inverse of the resize (`x = (x' + 0.5) * W / w' - 0.5`). The global
    `top_n` over all scales is returned with L2-normalised float32 descriptors, by decreasing score.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    if not scales or min(scales) <= 0:
        raise ConfigError(f"scales must be a non-empty list of positive factors, got {list(scales)}")
    height, width = image.shape[1:]
    locations, descriptors, scores = [], [], []
    with torch.no_grad():
        for scale in scales:
            size = (max(1, round(scale * height)), max(1, round(scale * width)))
            scaled = F.interpolate(
                image[None], size=size, mode="bilinear", align_corners=False, antialias=True
            )
            features = feature_fn(scaled)
            field = rf if isinstance(rf, ReceptiveField) else rf(*size)
            found = select_keypoints(features[0], scorer(features)[0], field, top_n, threshold)
            resize = torch.tensor([width / size[1], height / size[0]], device=found[0].device)
            locations.append((found[0] + 0.5) * resize - 0.5)
            descriptors.append(found[1])
            scores.append(found[2])
    all_scores = torch.cat(scores)
    keep = _strongest(all_scores, top_n, threshold=None)
    return LocalFeatures(
        keypoints=torch.cat(locations)[keep].float().cpu().numpy(),
        descriptors=F.normalize(torch.cat(descriptors)[keep].float(), dim=1).cpu().numpy(),
        scores=all_scores[keep].float().cpu().numpy(),
        image_size=(int(height), int(width)),
    )
