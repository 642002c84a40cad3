"""`hetretrieval-train-attention`: DELF attention training (backbone frozen) on any labelled dataset.

Writes `attention.pt` in the run directory, for `hetretrieval-eval pooling=delf pooling.attention_checkpoint=...`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from hetretrieval.allocator import keep_freed_memory
from hetretrieval.config import CONFIG_DIR, instantiate
from hetretrieval.errors import HetRetrievalError

log = logging.getLogger(__name__)

ATTENTION_CHECKPOINT = "attention.pt"


def train_attention(cfg: DictConfig) -> Path:
    """Fit the attention as the config says; returns the path of the saved scorer."""
    import pytorch_lightning as pl  # torch and Lightning load here: `--help` answers without them

    from hetretrieval.loggers import build_loggers, logged_run
    from hetretrieval.models.local.pipeline import StageFeatures
    from hetretrieval.seeding import seed_everything
    from hetretrieval.training.attention import AttentionTraining, LabelledCrops

    seed_everything(cfg.seed)
    dataset = instantiate(cfg.dataset)
    backbone = instantiate(cfg.backbone)
    datamodule = LabelledCrops(dataset, cfg.training.image_size, cfg.training.batch_size,
                               cfg.training.num_workers, cfg.seed)
    module = AttentionTraining(StageFeatures(backbone, cfg.stage), datamodule.n_classes, cfg.hidden_channels,
                               cfg.optimizer.lr, cfg.optimizer.weight_decay)
    loggers = build_loggers(cfg, f"attention-{backbone.model_name}-{dataset.name}")
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=loggers or False)
    with logged_run(loggers):
        trainer.fit(module, datamodule=datamodule)
    path = module.save_attention(Path(cfg.paths.output_dir) / ATTENTION_CHECKPOINT, backbone.model_name)
    print(f"attention saved to {path}: use pooling=delf pooling.attention_checkpoint={path}")
    return path


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="attention_train")
def main(cfg: DictConfig) -> None:
    keep_freed_memory()
    try:
        train_attention(cfg)
    except HetRetrievalError as error:
        raise SystemExit(f"hetretrieval: {error}") from None


if __name__ == "__main__":
    main()
