"""One backbone, many heads: the network every extraction runs (cirtorch's features -> pool -> L2 -> whiten).

Heads are the descriptor poolings of the `pooling` group (MAC, SPoC, GeM, R-MAC, NetVLAD); all of them read the
same feature map, so describing an image with four heads costs one backbone pass per scale, not four.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from hetretrieval.errors import ConfigError
from hetretrieval.models.backbones import Backbone
from hetretrieval.models.pooling.functional import aggregate_scales, resize_to_scale
from hetretrieval.models.whitening import Whitening


class RetrievalNetwork(nn.Module):
    """`(B, 3, H, W)` images in [0, 1] -> `{head name: (B, D_head)}` L2-normalised descriptors.

    With several `scales`, the backbone also describes every rescaled batch and each head's per-scale
    descriptors are averaged and re-normalised (`aggregate_scales`); a head's `whitening`, if any, is applied
    last. The modules are shared, not copied: a network built over a training module's backbone and head
    describes with the weights being trained.
    """

    def __init__(self, backbone: Backbone, heads: Mapping[str, nn.Module], scales: Sequence[float] = (1.0,),
                 whitening: Mapping[str, Whitening | None] | None = None) -> None:
        super().__init__()
        scales = tuple(float(s) for s in scales)
        if not scales or any(s <= 0 for s in scales):
            raise ConfigError(f"scales must be a non-empty list of positive numbers, got {list(scales)}")
        self.backbone = backbone
        self.heads = nn.ModuleDict(dict(heads))
        self.scales = scales
        self.whitening = nn.ModuleDict({name: w for name, w in (whitening or {}).items() if w is not None})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        per_scale: dict[str, list[torch.Tensor]] = {name: [] for name in self.heads}
        for scale in self.scales:
            features = self.backbone(resize_to_scale(images, scale))
            for name, head in self.heads.items():
                per_scale[name].append(head(features))
        descriptors = {}
        for name, values in per_scale.items():
            described = values[0] if len(values) == 1 else aggregate_scales(values)
            descriptors[name] = self.whitening[name](described) if name in self.whitening else described
        return descriptors
