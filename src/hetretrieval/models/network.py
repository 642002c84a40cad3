"""One backbone, many heads: the network every extraction runs (cirtorch's features -> pool -> L2 -> whiten).

Heads are the descriptor poolings of the `pooling` group (MAC, SPoC, GeM, R-MAC, NetVLAD); all of them read the
same feature map, so describing an image with four heads costs one backbone pass per scale, not four. A head
whose `reads` is `"class_token"` (`cls`) gets the transformer's class token of the same pass instead of the map.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from hetretrieval.errors import ConfigError
from hetretrieval.models.backbones import Backbone
from hetretrieval.models.pooling.functional import aggregate_scales, power_mean_scales, resize_to_scale
from hetretrieval.models.whitening import Whitening

SCALE_AGGREGATIONS = ("mean", "gem")  # extraction.scale_aggregation


class RetrievalNetwork(nn.Module):
    """`(B, 3, H, W)` images in [0, 1] -> `{head name: (B, D_head)}` L2-normalised descriptors.

    With several `scales`, the backbone also describes every rescaled batch and each head's per-scale
    descriptors are combined: `scale_aggregation="mean"` averages and re-normalises them (`aggregate_scales`),
    `"gem"` takes their power mean with the head's own GeM exponent `p` (1 for the other heads), as cirtorch's
    multi-scale `msp` (`power_mean_scales`); a head's `whitening`, if any, is applied last. The modules are shared, not copied: a network built over a training module's backbone and head
    describes with the weights being trained.
    """

    def __init__(self, backbone: Backbone, heads: Mapping[str, nn.Module], scales: Sequence[float] = (1.0,),
                 whitening: Mapping[str, Whitening | None] | None = None, scale_aggregation: str = "mean") -> None:
        super().__init__()
        scales = tuple(float(s) for s in scales)
        if not scales or any(s <= 0 for s in scales):
            raise ConfigError(f"scales must be a non-empty list of positive numbers, got {list(scales)}")
        if scale_aggregation not in SCALE_AGGREGATIONS:
            raise ConfigError(f"scale_aggregation must be one of {', '.join(SCALE_AGGREGATIONS)}, got "
                              f"{scale_aggregation!r}")
        for name, head in heads.items():
            if _reads_class_token(head) and not getattr(backbone, "has_class_token", False):
                raise ConfigError(
                    f"head '{name}' reads the class token, which backbone "
                    f"{getattr(backbone, 'model_name', type(backbone).__name__)} has not (a ViT with one: "
                    f"DINOv2, CLIP); pool its map instead (e.g. pooling=gem)")
        self.scale_aggregation = scale_aggregation
        self.backbone = backbone
        self.heads = nn.ModuleDict(dict(heads))
        self.scales = scales
        self.whitening = nn.ModuleDict({name: w for name, w in (whitening or {}).items() if w is not None})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        per_scale: dict[str, list[torch.Tensor]] = {name: [] for name in self.heads}
        for scale in self.scales:
            features, class_token = _backbone_outputs(self.backbone, resize_to_scale(images, scale))
            for name, head in self.heads.items():
                per_scale[name].append(head(class_token) if _reads_class_token(head) else head(features))
        descriptors = {}
        for name, values in per_scale.items():
            if len(values) == 1:
                described = values[0]
            elif self.scale_aggregation == "gem":
                described = power_mean_scales(values, float(getattr(self.heads[name], "p", 1.0)))
            else:
                described = aggregate_scales(values)
            descriptors[name] = self.whitening[name](described) if name in self.whitening else described
        return descriptors


def _reads_class_token(head: nn.Module) -> bool:
    return getattr(head, "reads", "map") == "class_token"


def _backbone_outputs(backbone: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The backbone's map and class token (None for backbones without `features_and_class_token`)."""
    if hasattr(backbone, "features_and_class_token"):
        return backbone.features_and_class_token(images)
    return backbone(images), None
