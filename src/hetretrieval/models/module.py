"""The one LightningModule: backbone -> head (-> whitening), extracting in `predict` and fine-tuning in `fit`.

Evaluation builds it as ``RetrievalModule(backbone, head, scales)``; fine-tuning adds a loss, a miner, optimiser
options and an augmentation. The model definition is shared: training, validation and extraction all go
through the same backbone, head and optional whitening.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from hetretrieval.config import instantiate
from hetretrieval.data.datamodule import merge_gathered
from hetretrieval.errors import ConfigError, DataError
from hetretrieval.models.backbones import Backbone
from hetretrieval.models.pooling.functional import aggregate_scales, resize_to_scale
from hetretrieval.models.whitening import Whitening
from hetretrieval.training.evaluation import retrieval_metrics
from hetretrieval.training.optimization import OptimizerOptions, build_optimization

ARCHITECTURE = "architecture"


class RetrievalModule(pl.LightningModule):
    """Describes images `(B, 3, H, W)` in [0, 1] as L2-normalised descriptors `(B, D)`.

    With several `scales`, each batch is also described at every rescaled size and the per-scale descriptors
    are averaged and re-normalised (`aggregate_scales`); a fitted `whitening` then maps them to `(B, d)`.

    Fine-tuning (`trainer.fit`) takes `loss` over tuple batches `{"images": (T, S, 3, H, W)}` or labelled batches
    `{"images": (N, 3, H, W), "labels": (N,)}` with triplets from `miner`, optimised as `optimizer` says; the
    images are first varied by `augmentation` (seeded by epoch and batch). Training describes at scale 1.
    `freeze_batchnorm` keeps the backbone's batch-norm statistics at their pretrained values (small, class-
    balanced batches otherwise overwrite them); their affine parameters still train.
    Validation evaluates the datamodule's `val_dataset` and logs `val/mAP` (global, per class, per domain pair).
    `architecture` holds the backbone and head config nodes (`_target_`) and is stored in checkpoints, so that
    :func:`load_for_evaluation` can rebuild the module from a checkpoint alone.
    """

    def __init__(self, backbone: Backbone, head: nn.Module, scales: Sequence[float] = (1.0,), *,
                 whitening: Whitening | None = None, loss: nn.Module | None = None, miner: nn.Module | None = None,
                 optimizer: OptimizerOptions | None = None, augmentation: nn.Module | None = None,
                 validation_ks: Sequence[int] = (1, 5, 10), seed: int = 0, freeze_batchnorm: bool = False,
                 architecture: Mapping | None = None) -> None:
        super().__init__()
        scales = tuple(float(s) for s in scales)
        if not scales or any(s <= 0 for s in scales):
            raise ConfigError(f"scales must be a non-empty list of positive numbers, got {list(scales)}")
        self.backbone = backbone
        self.head = head
        self.scales = scales
        self.whitening = whitening
        self.loss = loss
        self.miner = miner
        self.optimizer_options = optimizer or OptimizerOptions()
        self.augmentation = augmentation
        self.validation_ks = tuple(validation_ks)
        self.seed = seed
        self.freeze_batchnorm = freeze_batchnorm
        self.architecture = dict(architecture) if architecture is not None else None
        self._validation_parts: list[tuple[np.ndarray, np.ndarray]] = []

    @property
    def descriptor_name(self) -> str:
        name = getattr(self.head, "name", type(self.head).__name__.lower())
        return name if self.whitening is None else f"{name}+whitening"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        per_scale = [self.head(self.backbone(resize_to_scale(images, s))) for s in self.scales]
        descriptors = per_scale[0] if len(per_scale) == 1 else aggregate_scales(per_scale)
        return descriptors if self.whitening is None else self.whitening(descriptors)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        descriptors = self(batch["images"]) if len(batch["index"]) else torch.empty(0, 0)
        return {"index": batch["index"].cpu(), "descriptors": descriptors.float().cpu(), "failed": batch["failed"]}

    # --- fit -------------------------------------------------------------------------------------------------

    def describe_for_training(self, images: torch.Tensor) -> torch.Tensor:
        """`(B, 3, H, W)` -> `(B, D)` at scale 1, through the whitening if there is one."""
        descriptors = self.head(self.backbone(images))
        return descriptors if self.whitening is None else self.whitening(descriptors)

    def train(self, mode: bool = True) -> RetrievalModule:
        super().train(mode)
        if mode and self.freeze_batchnorm:
            for layer in self.backbone.modules():
                if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                    layer.eval()
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning 2.6 restores each layer's own mode instead of calling train(): apply freeze_batchnorm here.
        self.train()
        # Global randomness (dropout, drop-path) restarts from the epoch number: resumed runs match.
        torch.manual_seed(self.seed * 1_000_003 + self.current_epoch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.loss is None:
            raise ConfigError("RetrievalModule needs a loss to be trained")
        images = batch["images"]
        tuple_shape = images.shape[:2] if images.ndim == 5 else None
        images = images.flatten(0, 1) if tuple_shape is not None else images
        if self.augmentation is not None:
            images = self.augmentation(images, draw=self.current_epoch * 1_000_003 + batch_idx)
        descriptors = self.describe_for_training(images)
        if tuple_shape is not None:
            loss = self.loss(descriptors.unflatten(0, tuple_shape))
        else:
            labels = batch["labels"]
            mined = self.miner(descriptors, labels) if self.miner is not None else None
            if mined is not None:
                self.log("train/mined_triplets", float(len(mined[0])), on_step=True, on_epoch=False)
            loss = self.loss(descriptors, labels, mined)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(images))
        if isinstance(getattr(self.head, "p", None), torch.Tensor):
            self.log("train/gem_p", self.head.p.detach().float(), on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> dict:
        optimizer, scheduler = build_optimization(self.backbone, self.head, self.optimizer_options,
                                                  self.trainer.max_epochs or 1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def on_validation_epoch_start(self) -> None:
        self._validation_parts = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if len(batch["index"]):
            self._validation_parts.append((batch["index"].cpu().numpy(), self(batch["images"]).float().cpu().numpy()))

    def on_validation_epoch_end(self) -> None:
        dataset = self.trainer.datamodule.val_dataset
        descriptors, valid = merge_gathered(self._validation_parts, len(dataset))
        metrics = retrieval_metrics(descriptors, valid, dataset, self.validation_ks)
        self.log_dict({f"val/{name}": value for name, value in metrics.items()})
        self._validation_parts = []

    # --- checkpoints -----------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.architecture is not None:
            checkpoint[ARCHITECTURE] = self.architecture

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.whitening = whitening_from_state(checkpoint["state_dict"], self.device)


def whitening_from_state(state_dict: Mapping[str, torch.Tensor], device: torch.device | str = "cpu") -> Whitening | None:
    """A whitening layer shaped as the one saved in `state_dict` (values loaded with it), or None."""
    if "whitening.projection" not in state_dict:
        return None
    return Whitening(torch.zeros_like(state_dict["whitening.mean"]),
                     torch.zeros_like(state_dict["whitening.projection"])).to(device)


def load_for_evaluation(path: str | Path, scales: Sequence[float] = (1.0,)) -> RetrievalModule:
    """Rebuild a fine-tuned module (backbone, head, whitening) from a checkpoint written by `hetretrieval-train`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"checkpoint '{path}' does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    architecture = checkpoint.get(ARCHITECTURE)
    if architecture is None or "state_dict" not in checkpoint:
        raise DataError(f"checkpoint '{path}' has no model architecture: was it written by hetretrieval-train?")
    # The checkpoint holds every weight and the input normalisation: skip loading pretrained weights first.
    backbone = instantiate({**architecture["backbone"], "pretrained": False, "checkpoint": None})
    module = RetrievalModule(backbone, instantiate(architecture["head"]), scales,
                             whitening=whitening_from_state(checkpoint["state_dict"]), architecture=architecture)
    weights = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith(("backbone.", "head.", "whitening."))}
    module.load_state_dict(weights, strict=True)
    return module.eval()
