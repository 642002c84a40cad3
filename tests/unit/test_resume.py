"""resume=latest finds the experiment's newest last.ckpt; checkpoints carry the W&B run id and the best one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hetretrieval.config import CONFIG_DIR, instantiate
from hetretrieval.errors import ConfigError
from hetretrieval.training.resume import checkpoint_wandb_run_id, find_latest_checkpoint, resolve_resume


def _checkpoint(path, mtime, **content):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(content, path)
    os.utime(path, ns=(mtime, mtime))
    return path


def test_latest_checkpoint_is_the_newest_outside_the_current_run(tmp_path):
    older = _checkpoint(tmp_path / "runs/a/checkpoints/last.ckpt", 1_000)
    newer = _checkpoint(tmp_path / "multiruns/b/0/checkpoints/last.ckpt", 2_000)
    _checkpoint(tmp_path / "runs/b/checkpoints/best.ckpt", 3_000)
    current = _checkpoint(tmp_path / "runs/now/checkpoints/last.ckpt", 4_000)
    assert find_latest_checkpoint(tmp_path, exclude=current.parents[1]) == newer
    assert resolve_resume("latest", tmp_path, tmp_path / "runs/now") == newer
    assert resolve_resume(str(older), tmp_path, tmp_path / "runs/now") == older
    assert resolve_resume(None, tmp_path, tmp_path) is None


def test_missing_checkpoints_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoints"):
        resolve_resume("latest", tmp_path, tmp_path / "now")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_resume(str(tmp_path / "nope.ckpt"), tmp_path, tmp_path / "now")


def test_wandb_run_id_round_trips_through_the_checkpoint(tmp_path):
    assert checkpoint_wandb_run_id(_checkpoint(tmp_path / "a.ckpt", 1, wandb_run_id="abc123")) == "abc123"
    assert checkpoint_wandb_run_id(_checkpoint(tmp_path / "b.ckpt", 1, state_dict={})) is None


class _Scheduled(pl.LightningModule):
    """A tiny model whose `val/mAP` of epoch e is SCORES[e], whatever it learns."""

    SCORES = (0.9, 0.5, 0.1)  # best at the first epoch

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx) -> None:
        self.log("val/mAP", self.SCORES[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_run(run_dir, epochs: int, ckpt_path=None) -> pl.Trainer:
    """Fit with the checkpoint callbacks of `conf/callbacks/default.yaml`, writing into `run_dir/checkpoints`."""
    callbacks = []
    for name in ("model_checkpoint", "last_checkpoint"):
        node = OmegaConf.load(CONFIG_DIR / "callbacks" / f"{name}.yaml")[name]
        node.dirpath = str(run_dir / "checkpoints")
        callbacks.append(instantiate(node))
    data = DataLoader(TensorDataset(torch.rand(4, 2)), batch_size=2)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=run_dir)
    trainer.fit(_Scheduled(), data, data, ckpt_path=ckpt_path)
    return trainer


def test_resuming_into_a_new_run_folder_keeps_the_best_checkpoint(tmp_path):
    killed = _fit_run(tmp_path / "killed", epochs=2)  # best at epoch 1, killed after epoch 2
    assert killed.checkpoint_callback.best_model_score == 0.9
    resumed = _fit_run(tmp_path / "resumed", epochs=3, ckpt_path=tmp_path / "killed/checkpoints/last.ckpt")
    best = resumed.checkpoint_callback
    assert resumed.current_epoch == 3  # epoch 3's val/mAP 0.1 was no better
    assert best.best_model_score == pytest.approx(0.9)
    best_path = Path(best.best_model_path)
    assert best_path.is_file() and best_path.parent == tmp_path / "resumed/checkpoints"  # a copy of its own
    assert torch.load(best_path, weights_only=True)["epoch"] == 0
    assert list(best.best_k_models) == [str(best_path)]


def test_resuming_without_the_best_checkpoint_file_is_a_config_error(tmp_path):
    killed = _fit_run(tmp_path / "killed", epochs=1)
    Path(killed.checkpoint_callback.best_model_path).unlink()
    with pytest.raises(ConfigError, match="does not exist any more"):
        _fit_run(tmp_path / "resumed", epochs=2, ckpt_path=tmp_path / "killed/checkpoints/last.ckpt")
