"""The fine-tuning path end to end on a tiny built-in benchmark: every loss x miner, whitening, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from hetretrieval.cli.train import train
from hetretrieval.config import CONFIG_DIR
from hetretrieval.models.checkpoints import load_fine_tuned

TINY = [
    "dataset.photos=[astronaut,coffee,chelsea,rocket]", "dataset.variants_per_class=5", "dataset.image_size=64",
    "training.image_size=32", "extraction.max_size=32", "extraction.batch_size=24", "backbone.pretrained=false",
    "validation.fraction=0.35", "miner.n_queries=6", "miner.pool_size=12", "miner.n_negatives=2",
    "miner.tuples_per_batch=3",
]
CLASS_BALANCED = ["miner.classes_per_batch=3", "miner.images_per_class=2", "miner.batches_per_epoch=2"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _config(tmp_path: Path, cache_dir: Path, overrides: list[str]) -> DictConfig:
    miner = next((o.split("=")[1] for o in overrides if o.startswith("miner=")), "epoch_tuples")
    tiny = [o for o in TINY if not o.startswith("miner.") or miner == "epoch_tuples"]
    tiny += CLASS_BALANCED if miner != "epoch_tuples" else []
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, *tiny, "~logger", "trainer.enable_progress_bar=false",
                                          "trainer.accelerator=cpu"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.cache_dir = str(cache_dir)
    return cfg


class TrainingProbe(pl.Callback):
    """Records what one fast_dev_run step did: the loss, what the miner found, the weights before and after."""

    last: TrainingProbe | None = None

    def __init__(self) -> None:
        self.losses, self.mined, self.tuples = [], [], []
        TrainingProbe.last = self

    def on_fit_start(self, trainer, module) -> None:
        self.before = {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))
        if "train/mined_triplets" in trainer.callback_metrics:
            self.mined.append(float(trainer.callback_metrics["train/mined_triplets"]))
        if batch["images"].ndim == 5:  # epoch tuples: (tuples, 2 + n_neg, 3, h, w)
            self.tuples.append(tuple(batch["images"].shape[:2]))

    def on_fit_end(self, trainer, module) -> None:
        self.after = {k: v.detach().clone() for k, v in module.named_parameters() if k in self.before}


@pytest.mark.parametrize("loss", ["contrastive", "triplet"])
@pytest.mark.parametrize("miner", ["epoch_tuples", "batch_hard", "semihard"])
def test_fast_dev_run_trains_every_loss_and_miner(tmp_path, cache_dir, loss, miner):
    cfg = _config(tmp_path, cache_dir, [f"loss={loss}", f"miner={miner}", "+trainer.fast_dev_run=true",
                                        "test.off_the_shelf=false",
                                        "+callbacks.probe._target_=test_training.TrainingProbe"])
    report = train(cfg)
    assert report["test"] == {"fine_tuned": {}}
    probe = TrainingProbe.last
    assert len(probe.losses) == 1 and math.isfinite(probe.losses[0]) and probe.losses[0] > 0
    if miner == "epoch_tuples":  # 3 tuples per batch, each a query, a positive and 2 negatives
        assert probe.tuples == [(3, 4)] and probe.mined == []
    elif miner == "batch_hard":  # a hardest positive and negative for every anchor of the 3 x 2 batch
        assert probe.mined == [6.0]
    else:  # semi-hard negatives depend on the distances: none may exist, but the count is logged
        assert len(probe.mined) == 1 and probe.mined[0] >= 0
    changed = [k for k, v in probe.before.items() if not torch.equal(v, probe.after[k])]
    assert changed, "one optimiser step changed no weight"
    assert all(torch.isfinite(v).all() for v in probe.after.values())


def test_whitened_checkpoint_evaluates_like_the_trained_module(tmp_path, cache_dir):
    cfg = _config(tmp_path, cache_dir, ["miner=batch_hard", "+trainer.fast_dev_run=true", "whitening=pca",
                                        "whitening.dim=8", "+test.datasets.tiny=${dataset}", "test.off_the_shelf=false"])
    report = train(cfg)
    assert set(report["test"]) == {"fine_tuned", "fine_tuned+pca"}
    summary = json.loads((tmp_path / "run/test/tiny/fine_tuned+pca/summary.json").read_text())
    assert summary["dim"] == 8
    fine_tuned = load_fine_tuned(tmp_path / "run/checkpoints/whitened.ckpt")
    images = torch.rand(2, 3, 32, 32)
    descriptors = fine_tuned.whitening(fine_tuned.head(fine_tuned.backbone(images)))
    assert descriptors.shape == (2, 8)
    torch.testing.assert_close(descriptors.norm(dim=1), torch.ones(2))


def _fit(tmp_path, cache_dir, name: str, epochs: int, resume: str | None = None) -> tuple[dict, dict]:
    overrides = ["miner=batch_hard", "loss=triplet", "augmentation=variations", f"trainer.max_epochs={epochs}",
                 "test.off_the_shelf=false", "optimizer.lr=1e-4", "task_name=resume_test"]
    cfg = _config(tmp_path / name, cache_dir, overrides + ([f"resume={resume}"] if resume else []))
    with open_dict(cfg):
        cfg.paths.log_dir = str(tmp_path / "logs")  # one experiment folder for all runs
        cfg.paths.output_dir = str(tmp_path / "logs" / "resume_test" / "runs" / name)
    report = train(cfg)
    last = torch.load(Path(cfg.paths.output_dir) / "checkpoints/last.ckpt", weights_only=True)
    return report, last


def test_resuming_a_killed_run_reproduces_the_uninterrupted_run(tmp_path, cache_dir):
    uninterrupted, expected = _fit(tmp_path, cache_dir, "uninterrupted", epochs=2)
    _, killed = _fit(tmp_path, cache_dir, "killed", epochs=1)  # stops after epoch 1, as if killed there
    assert killed["epoch"] == 0
    resumed, actual = _fit(tmp_path, cache_dir, "resumed", epochs=2, resume="latest")
    assert actual["epoch"] == expected["epoch"] == 1
    for key, value in expected["state_dict"].items():
        torch.testing.assert_close(actual["state_dict"][key], value, rtol=0, atol=0, msg=key)
    best = next(v for k, v in actual["callbacks"].items() if "'monitor': 'val/mAP'" in k)
    expected_best = next(v for k, v in expected["callbacks"].items() if "'monitor': 'val/mAP'" in k)
    assert best["current_score"] == expected_best["current_score"]  # epoch-2 val/mAP
    assert resumed["best_val/mAP"] == uninterrupted["best_val/mAP"]
