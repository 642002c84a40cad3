"""conf/train.yaml and its groups compose and build their objects."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from hetretrieval.config import CONFIG_DIR, typed
from hetretrieval.training.augmentation import VariationAugmentation
from hetretrieval.training.datamodule import ClassBalancedBatches, EpochTuples
from hetretrieval.training.losses import ContrastiveLoss, TripletLoss
from hetretrieval.training.mining import TripletMiner
from hetretrieval.training.optimization import OptimizerOptions
from hetretrieval.training.whitening_fit import WhiteningOptions


def _compose(*overrides: str):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("loss, loss_type", [("contrastive", ContrastiveLoss), ("triplet", TripletLoss)])
@pytest.mark.parametrize("miner, sampling_type, strategy", [
    ("epoch_tuples", EpochTuples, None), ("batch_hard", ClassBalancedBatches, "batch_hard"),
    ("semihard", ClassBalancedBatches, "semihard")])
def test_loss_and_miner_groups_build(loss, loss_type, miner, sampling_type, strategy):
    cfg = _compose(f"loss={loss}", f"miner={miner}")
    built_loss, sampling = instantiate(cfg.loss), instantiate(cfg.miner)
    assert isinstance(built_loss, loss_type) and isinstance(sampling, sampling_type)
    in_batch = sampling.miner(built_loss)
    assert (in_batch is None) if strategy is None else (isinstance(in_batch, TripletMiner)
                                                        and in_batch.strategy == strategy
                                                        and in_batch.margin == built_loss.margin)


@pytest.mark.parametrize("optimizer, whitening", [("adam", "none"), ("adamw", "lw"), ("adam", "pca")])
def test_optimizer_and_whitening_groups_are_typed(optimizer, whitening):
    cfg = _compose(f"optimizer={optimizer}", f"whitening={whitening}")
    assert typed(cfg.optimizer, OptimizerOptions, "optimizer").name == optimizer
    assert typed(cfg.whitening, WhiteningOptions, "whitening").kind == whitening


def test_default_config_trains_with_checkpointing_on_validation_map():
    cfg = _compose()
    assert cfg.callbacks.model_checkpoint.monitor == "val/mAP" and cfg.callbacks.model_checkpoint.mode == "max"
    assert cfg.callbacks.last_checkpoint.filename == "last" and cfg.callbacks.last_checkpoint.monitor is None
    assert cfg.trainer.reload_dataloaders_every_n_epochs == 1 and cfg.resume is None
    assert not cfg.augmentation


@pytest.mark.parametrize("experiment", ["finetune_pacs", "finetune_pacs_variations", "finetune_pacs_sweep",
                                        "finetune_pacs_tuples"])
def test_experiments_compose(experiment):
    cfg = _compose(f"experiment={experiment}")
    assert list(cfg.dataset.domains) == ["photo", "art_painting"]
    assert set(cfg.test.datasets) == {"sketch_to_photo", "cartoon_to_photo"}
    assert isinstance(instantiate(cfg.augmentation), VariationAugmentation) == (experiment.endswith("variations"))
