"""DELF's second training stage: learn the keypoint attention with a classification loss, backbone frozen.

`AttentionTraining` classifies square crops of labelled images through `AttentionClassifier` on the frozen
features of one backbone stage (`StageFeatures`, the same features `DelfExtractor` describes), so the attention
learns which local features discriminate the classes. `save_attention` writes the trained scorer for
`pooling=delf pooling.attention_checkpoint=...`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from hetretrieval.data.datasets import RetrievalDataset
from hetretrieval.errors import DataError
from hetretrieval.extraction.batching import ImagePlan, ImageSource
from hetretrieval.metrics.retrieval import label_codes
from hetretrieval.models.local.attention import AttentionClassifier
from hetretrieval.models.local.pipeline import StageFeatures
from hetretrieval.seeding import mix_seed
from hetretrieval.training.datamodule import CroppedImages, collate_crops


class LabelledCrops(pl.LightningDataModule):
    """Random square crops of a dataset's labelled, readable images (others are left out, unreadable ones
    logged), re-drawn every epoch."""

    def __init__(self, dataset: RetrievalDataset, image_size: int = 224, batch_size: int = 16,
                 num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        codes = label_codes(dataset.labels)
        plan = ImagePlan.scan(dataset.records, ImageSource(max_size=None, crop_size=image_size), verify=True)
        self.indices = np.flatnonzero((codes >= 0) & plan.readable)
        self.n_classes = int(codes.max()) + 1 if self.indices.size else 0
        if self.n_classes < 2:
            raise DataError(f"attention training needs labelled images of at least 2 classes in '{dataset.name}'")
        records = [dataset.records[i] for i in self.indices]
        self.images = CroppedImages(records, codes[self.indices].tolist(),
                                    ImagePlan.scan(records, ImageSource(max_size=None, crop_size=image_size)), seed)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer else 0
        self.images.epoch = epoch
        order = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch)))
        return DataLoader(self.images, sampler=[(draw, int(i)) for draw, i in enumerate(order)],
                          batch_size=self.batch_size, collate_fn=collate_crops, num_workers=self.num_workers)


class AttentionTraining(pl.LightningModule):
    """`(B, 3, S, S)` crops -> class logits through frozen stage features and a trainable DELF attention."""

    def __init__(self, features: StageFeatures, n_classes: int, hidden_channels: int = 512, lr: float = 1e-3,
                 weight_decay: float = 1e-4) -> None:
        super().__init__()
        self.features = features.eval().requires_grad_(False)
        self.classifier = AttentionClassifier(features.out_channels, n_classes, hidden_channels)
        self.hidden_channels, self.lr, self.weight_decay = hidden_channels, lr, weight_decay

    def train(self, mode: bool = True) -> AttentionTraining:
        super().train(mode)
        self.features.eval()  # frozen: batch-norm statistics stay the pretrained ones
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.features(images)
        return self.classifier(features)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["images"])
        loss = F.cross_entropy(logits, batch["labels"])
        accuracy = (logits.argmax(1) == batch["labels"]).float().mean()
        self.log_dict({"train/loss": loss, "train/accuracy": accuracy}, on_step=True, on_epoch=True,
                      prog_bar=True, batch_size=len(logits))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.classifier.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def save_attention(self, path: str | Path, backbone_name: str) -> Path:
        """Write the trained scorer as `load_attention_scorer` reads it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"backbone": backbone_name, "stage": self.features.stage,
                    "in_channels": self.features.out_channels, "hidden_channels": self.hidden_channels,
                    "state_dict": self.classifier.attention.state_dict()}, path)
        return path
