"""The one LightningModule: backbone -> head, extracting descriptors in `predict` (and training in `fit` later)."""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from torch import nn

from hetretrieval.errors import ConfigError
from hetretrieval.models.backbones import Backbone
from hetretrieval.models.pooling.functional import aggregate_scales, resize_to_scale


class RetrievalModule(pl.LightningModule):
    """Describes images `(B, 3, H, W)` in [0, 1] as L2-normalised descriptors `(B, D)`.

    With several `scales`, each batch is also described at every rescaled size and the per-scale descriptors
    are averaged and re-normalised (`aggregate_scales`).
    """

    def __init__(self, backbone: Backbone, head: nn.Module, scales: Sequence[float] = (1.0,)) -> None:
        super().__init__()
        scales = tuple(float(s) for s in scales)
        if not scales or any(s <= 0 for s in scales):
            raise ConfigError(f"scales must be a non-empty list of positive numbers, got {list(scales)}")
        self.backbone = backbone
        self.head = head
        self.scales = scales

    @property
    def descriptor_name(self) -> str:
        return getattr(self.head, "name", type(self.head).__name__.lower())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        per_scale = [self.head(self.backbone(resize_to_scale(images, s))) for s in self.scales]
        return per_scale[0] if len(per_scale) == 1 else aggregate_scales(per_scale)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        descriptors = self(batch["images"]) if len(batch["index"]) else torch.empty(0, 0)
        return {"index": batch["index"].cpu(), "descriptors": descriptors.float().cpu(), "failed": batch["failed"]}
