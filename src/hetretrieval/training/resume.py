"""Resuming an experiment: its latest checkpoint and the W&B run it was logging to.

Checkpoints carry the W&B run id (written by :class:`RunIdentity`), so a resumed run keeps appending to the
same W&B run instead of starting a new one.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch

from hetretrieval.errors import ConfigError

WANDB_RUN_ID = "wandb_run_id"


class RunIdentity(pl.Callback):
    """Stores the W&B run id of the trainer's ``WandbLogger`` (if any) in every checkpoint."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                checkpoint[WANDB_RUN_ID] = logger.version


def find_latest_checkpoint(experiment_dir: str | Path, exclude: str | Path | None = None) -> Path:
    """The most recently written ``checkpoints/last.ckpt`` under ``experiment_dir`` (runs and multiruns),
    ignoring those under ``exclude`` (the current run's own folder)."""
    experiment_dir = Path(experiment_dir)
    candidates = [path for path in experiment_dir.glob("**/checkpoints/last.ckpt")
                  if exclude is None or Path(exclude).resolve() not in path.resolve().parents]
    if not candidates:
        raise ConfigError(f"resume=latest: no checkpoints/last.ckpt under {experiment_dir}")
    return max(candidates, key=lambda path: path.stat().st_mtime_ns)


def resolve_resume(resume: str | None, experiment_dir: str | Path, output_dir: str | Path) -> Path | None:
    """``None`` (a fresh run), ``"latest"`` (see :func:`find_latest_checkpoint`) or a checkpoint path."""
    if resume is None:
        return None
    if resume == "latest":
        return find_latest_checkpoint(experiment_dir, exclude=output_dir)
    path = Path(resume).expanduser()
    if not path.is_file():
        raise ConfigError(f"resume checkpoint '{path}' does not exist")
    return path


def checkpoint_wandb_run_id(path: str | Path) -> str | None:
    """The W&B run id a checkpoint was logged under, or None."""
    return torch.load(path, map_location="cpu", weights_only=True).get(WANDB_RUN_ID)
