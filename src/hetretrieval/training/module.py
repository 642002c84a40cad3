"""The fine-tuning LightningModule: backbone -> head (-> whitening), trained by a loss, validated by retrieval.

Training describes square crops at scale 1; validation describes the held-out split through the extraction
engine exactly as `hetretrieval-eval` does (size buckets, `extraction.scales`, DDP gather) and logs `val/mAP`
with the evaluation's own metrics. Checkpoints store the architecture as names and plain options
(`models/checkpoints.py`), so `hetretrieval-eval checkpoint=...` rebuilds the model from the file alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from hetretrieval.data.datasets import RetrievalDataset
from hetretrieval.errors import ConfigError
from hetretrieval.extraction.engine import Collector, ExtractionEngine
from hetretrieval.metrics.retrieval import evaluate_retrieval, metric_summary
from hetretrieval.models.backbones import Backbone
from hetretrieval.models.checkpoints import ARCHITECTURE, whitening_from_state
from hetretrieval.models.network import RetrievalNetwork
from hetretrieval.models.whitening import Whitening
from hetretrieval.seeding import mix_seed
from hetretrieval.training.optimization import OptimizerOptions, build_optimization


class FineTuningModule(pl.LightningModule):
    """Fine-tunes `backbone` and `head` (`(B, 3, H, W)` in [0, 1] -> L2-normalised `(B, D)`).

    `trainer.fit` takes `loss` over tuple batches `{"images": (T, S, 3, H, W)}` or labelled batches
    `{"images": (N, 3, H, W), "labels": (N,)}` with triplets from `miner`, optimised as `optimizer` says; the
    images are first varied by `augmentation` (seeded by epoch and batch). `freeze_batchnorm` keeps the
    backbone's batch-norm statistics at their pretrained values (small, class-balanced batches otherwise
    overwrite them); their affine parameters still train. `architecture` (names and options) is stored in
    every checkpoint.
    """

    def __init__(self, backbone: Backbone, head: nn.Module, scales: Sequence[float] = (1.0,), *,
                 whitening: Whitening | None = None, loss: nn.Module | None = None, miner: nn.Module | None = None,
                 optimizer: OptimizerOptions | None = None, augmentation: nn.Module | None = None,
                 validation_ks: Sequence[int] = (1, 5, 10), seed: int = 0, freeze_batchnorm: bool = False,
                 architecture: Mapping | None = None, batch_size: int = 32, num_workers: int = 0,
                 batch_pixels: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.whitening = whitening
        self.scales = tuple(float(s) for s in scales)
        self.loss, self.miner, self.augmentation = loss, miner, augmentation
        self.optimizer_options = optimizer or OptimizerOptions()
        self.validation_ks = tuple(validation_ks)
        self.seed, self.freeze_batchnorm = seed, freeze_batchnorm
        self.architecture = dict(architecture) if architecture is not None else None
        self.batch_size, self.batch_pixels, self.num_workers = batch_size, batch_pixels, num_workers
        self.engine()  # checks the scales now, not at the first validation
        self._collector: Collector | None = None

    @property
    def head_name(self) -> str:
        return str(getattr(self.head, "name", type(self.head).__name__.lower()))

    @property
    def descriptor_name(self) -> str:
        return self.head_name if self.whitening is None else f"{self.head_name}+whitening"

    def engine(self, scales: Sequence[float] | None = None) -> ExtractionEngine:
        """The extraction engine over this module's own backbone, head and whitening (shared, not copied)."""
        network = RetrievalNetwork(self.backbone, {self.head_name: self.head}, scales or self.scales,
                                   {self.head_name: self.whitening})
        return ExtractionEngine(network, batch_size=self.batch_size, batch_pixels=self.batch_pixels,
                                num_workers=self.num_workers, progress=False)

    def describe_for_training(self, images: torch.Tensor) -> torch.Tensor:
        """`(B, 3, H, W)` -> `(B, D)` at scale 1, through the whitening if there is one."""
        descriptors = self.head(self.backbone(images))
        return descriptors if self.whitening is None else self.whitening(descriptors)

    def train(self, mode: bool = True) -> FineTuningModule:
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
        torch.manual_seed(mix_seed(self.seed, self.current_epoch))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.loss is None:
            raise ConfigError("FineTuningModule needs a loss to be trained")
        images = batch["images"]
        tuple_shape = images.shape[:2] if images.ndim == 5 else None
        images = images.flatten(0, 1) if tuple_shape is not None else images
        if self.augmentation is not None:
            images = self.augmentation(images, draw=mix_seed(self.current_epoch, batch_idx))
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

    # --- validation: the extraction engine's batches, the evaluation's metrics --------------------------------

    def on_validation_epoch_start(self) -> None:
        datamodule = self.trainer.datamodule
        self._collector = self.engine().collector(len(datamodule.val_dataset), datamodule.validation_plan)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._collector.add(self.engine().describe_batch(batch))

    def on_validation_epoch_end(self) -> None:
        extraction = self._collector.finish()
        metrics = validation_metrics(extraction.descriptors.get(self.head_name, np.zeros((len(extraction.valid), 0))),
                                     extraction.valid, self.trainer.datamodule.val_dataset, self.validation_ks)
        self.log_dict({f"val/{name}": value for name, value in metrics.items()})
        self._collector = None

    # --- checkpoints -----------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.architecture is not None:
            checkpoint[ARCHITECTURE] = self.architecture

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.whitening = whitening_from_state(checkpoint["state_dict"], self.device)


def validation_metrics(descriptors: np.ndarray, valid: np.ndarray, dataset: RetrievalDataset,
                       ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """The evaluation's metrics (`metric_summary`), `class_mAP/<label>` and, when records carry a `domain`,
    `mAP/<query domain>-><database domain>`; undefined values (no query with a positive) are left out."""
    results = evaluate_retrieval(descriptors, dataset.labels, dataset.query_ids, dataset.database_ids, valid, ks,
                                 top_k=1)
    metrics = {k: v for k, v in metric_summary(results, ks).items() if v is not None}
    metrics.update({f"class_mAP/{label}": m for label, (n, m) in results.per_class.items() if n})
    domains = np.array([record.metadata.get("domain") for record in dataset.records], dtype=object)
    for query_domain in sorted({d for d in domains[dataset.query_ids] if d is not None}):
        for database_domain in sorted({d for d in domains[dataset.database_ids] if d is not None}):
            pair = replace(dataset, query_ids=dataset.query_ids[domains[dataset.query_ids] == query_domain],
                           database_ids=dataset.database_ids[domains[dataset.database_ids] == database_domain])
            pair_map = evaluate_retrieval(descriptors, pair.labels, pair.query_ids, pair.database_ids, valid, ks,
                                          top_k=1).mean_average_precision
            metrics[f"mAP/{query_domain}->{database_domain}"] = pair_map
    return {name: float(value) for name, value in metrics.items() if np.isfinite(value)}
