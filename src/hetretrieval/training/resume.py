"""Resuming an experiment: its latest checkpoint and the W&B run it was logging to.

Checkpoints carry the W&B run id (written by :class:`RunIdentity`), so a resumed run keeps appending to the
same W&B run instead of starting a new one; :class:`ResumableCheckpoint` carries the best checkpoint over.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from hetretrieval.errors import ConfigError
from hetretrieval.loggers import is_wandb
from hetretrieval.models.checkpoints import read_torch_file

WANDB_RUN_ID = "wandb_run_id"


class RunIdentity(pl.Callback):
    """Stores the W&B run id of the trainer's ``WandbLogger`` (if any) in every checkpoint."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        for logger in trainer.loggers:
            if is_wandb(logger):
                checkpoint[WANDB_RUN_ID] = logger.version


class ResumableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps the best checkpoints of the run it resumes into another folder.

    ``resume=latest`` writes into a new run folder, and Lightning restores the best score and top-k only when the
    ``dirpath`` is unchanged: the resumed run would take its next (maybe worse) validation as the best and test it.
    The top-k files are copied into the new ``dirpath`` rather than referred to in the old folder, so that the
    resumed run is self-contained (its report names a checkpoint of its own; the killed run can be deleted) and
    superseded ones are deleted as usual (Lightning never deletes a file outside ``dirpath``).
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            super().load_state_dict(state_dict)  # resumed in place: Lightning restores everything itself
            return
        moved = {path: str(Path(self.dirpath) / Path(path).name) for path in state_dict["best_k_models"]}
        for old, new in moved.items():
            if not Path(old).is_file():
                raise ConfigError(f"resume: best checkpoint '{old}' of the resumed run does not exist any more")
            if rank_zero_only.rank == 0:  # every process restores the state; one copies the files
                Path(new).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(old, new)
        self.best_k_models = {moved[path]: score for path, score in state_dict["best_k_models"].items()}
        self.best_model_score = state_dict["best_model_score"]
        self.best_model_path = moved.get(state_dict["best_model_path"], "")
        self.kth_best_model_path = moved.get(state_dict["kth_best_model_path"], "")
        self.kth_value = state_dict["kth_value"]


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
    checkpoint = read_torch_file(path, "resume checkpoint", ConfigError)
    return checkpoint.get(WANDB_RUN_ID) if isinstance(checkpoint, dict) else None
