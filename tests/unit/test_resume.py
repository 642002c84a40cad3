"""resume=latest finds the experiment's newest last.ckpt; checkpoints carry the W&B run id."""

from __future__ import annotations

import os

import pytest
import torch

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
