"""`hetretrieval-train`: fine-tune backbone x pooling on labelled data, then test against off-the-shelf.

One run: hold out a validation split, optionally test and validate the off-the-shelf model, fit (validating every N epochs,
keeping the best checkpoint by `val/mAP`), reload the best weights, optionally fit whitening, and test the
fine-tuned model on each `test.datasets` entry with the evaluator of `hetretrieval-eval`. `resume=latest`
continues the experiment's most recent run from its last checkpoint, in the same W&B run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from hetretrieval.allocator import keep_freed_memory
from hetretrieval.config import (
    CONFIG_DIR,
    EvaluationOptions,
    ExtractionOptions,
    check_entry_point,
    empty_dict_overrides,
    instantiate,
    typed,
)
from hetretrieval.errors import ConfigError, HetRetrievalError

if TYPE_CHECKING:  # torch and Lightning load in the functions: `--help` answers without them
    from hetretrieval.training.datamodule import TrainingDataModule
    from hetretrieval.training.module import FineTuningModule

log = logging.getLogger(__name__)


def build_module(cfg: DictConfig) -> FineTuningModule:
    """The module to fine-tune, from the backbone, pooling, loss, miner, optimizer and augmentation groups."""
    from hetretrieval.models.checkpoints import architecture_from_config
    from hetretrieval.models.factory import build_head
    from hetretrieval.training.module import FineTuningModule
    from hetretrieval.training.optimization import OptimizerOptions

    extraction = typed(cfg.extraction, ExtractionOptions, "extraction")
    architecture = architecture_from_config(cfg.backbone, cfg.pooling)  # refuses what a checkpoint cannot name
    loss = instantiate(cfg.loss)
    sampling = instantiate(cfg.miner)
    backbone = instantiate(cfg.backbone)
    return FineTuningModule(
        backbone, build_head(cfg.pooling, backbone), extraction.scales,
        loss=loss, miner=sampling.miner(loss), optimizer=typed(cfg.optimizer, OptimizerOptions, "optimizer"),
        augmentation=instantiate(cfg.augmentation) if cfg.get("augmentation") else None,
        validation_ks=typed(cfg.evaluation, EvaluationOptions, "evaluation").ks, seed=cfg.seed,
        freeze_batchnorm=cfg.training.freeze_batchnorm, architecture=architecture,
        batch_size=extraction.batch_size, batch_pixels=extraction.batch_pixels, num_workers=extraction.num_workers)


def build_datamodule(cfg: DictConfig) -> TrainingDataModule:
    """Training split (crops, mined examples) and validation split of `cfg.dataset`."""
    from hetretrieval.training.datamodule import TrainingDataModule, holdout_split

    extraction = typed(cfg.extraction, ExtractionOptions, "extraction")
    validation = cfg.validation
    train_set, val_set = holdout_split(instantiate(cfg.dataset), validation.fraction, cfg.seed,
                                       query=validation.query, database=validation.database)
    return TrainingDataModule(train_set, val_set, instantiate(cfg.miner), cfg.training.image_size,
                              extraction.max_size, extraction.batch_size, extraction.num_workers, cfg.seed,
                              extraction.max_pixels)


def test(module: FineTuningModule, cfg: DictConfig, variant: str) -> dict[str, dict]:
    """Evaluate `module` on every `test.datasets` entry (none when it is empty or null: `test.datasets={}` or
    `~test.datasets` drop an experiment's); result files under `<output_dir>/test/<name>/<variant>`."""
    from hetretrieval.evaluation.run import evaluate_engine
    from hetretrieval.extraction.batching import ImageSource

    extraction = typed(cfg.extraction, ExtractionOptions, "extraction")
    evaluation = typed(cfg.evaluation, EvaluationOptions, "evaluation")
    source = ImageSource(extraction.max_size, extraction.max_pixels)
    engine = module.engine()
    summaries = {}
    for name, node in (cfg.test.get("datasets") or {}).items():
        output_dir = Path(cfg.paths.output_dir) / "test" / name / variant
        by_head = evaluate_engine(engine, instantiate(node), source, output_dir, evaluation,
                                  {module.head_name: module.descriptor_name})
        summaries[name] = by_head[module.head_name]
    return summaries


def train(cfg: DictConfig) -> dict:
    """Fit and test as the module docstring says; returns the report written to `train_summary.json`:
    best checkpoint, off-the-shelf and best validation mAP, `test: {variant: {dataset: {mAP, class_mAP}}}`."""
    import pytorch_lightning as pl

    from hetretrieval.loggers import build_loggers, logged_run
    from hetretrieval.models.checkpoints import read_torch_file
    from hetretrieval.seeding import seed_everything
    from hetretrieval.training.resume import RunIdentity, checkpoint_wandb_run_id, resolve_resume
    from hetretrieval.training.whitening_fit import WhiteningOptions, fit_whitening

    seed_everything(cfg.seed)
    output_dir = Path(cfg.paths.output_dir)
    whitening = typed(cfg.whitening, WhiteningOptions, "whitening")
    if whitening.fit_on is not None or whitening.fit_options:
        raise ConfigError("hetretrieval-train fits whitening on its training set: drop whitening.fit_on / "
                          "whitening.fit_options (those are hetretrieval-eval's test-time whitening)")
    datamodule = build_datamodule(cfg)
    module = build_module(cfg)
    resume = resolve_resume(cfg.get("resume"), Path(cfg.paths.log_dir) / cfg.task_name, output_dir)
    if resume is not None and cfg.get("logger") and cfg.logger.get("wandb"):
        with open_dict(cfg):
            cfg.logger.wandb.id = checkpoint_wandb_run_id(resume)
            cfg.logger.wandb.resume = "allow"
    loggers = build_loggers(cfg, f"finetune-{module.descriptor_name}-{datamodule.train_dataset.name}")
    callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values()] + [RunIdentity()]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    tested: dict[str, dict[str, dict]] = {}
    with logged_run(loggers):
        off_the_shelf_val = None
        if cfg.test.off_the_shelf and resume is None:
            tested["off_the_shelf"] = test(module, cfg, "off_the_shelf")
            off_the_shelf_val = trainer.validate(module, datamodule=datamodule, verbose=False)[0].get("val/mAP")
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if best:
            log.info("testing the best checkpoint %s", best)
            module.load_state_dict(read_torch_file(best, "best checkpoint")["state_dict"])
        tested["fine_tuned"] = test(module, cfg, "fine_tuned")
        if whitening.kind != "none":
            module.whitening = fit_whitening(module, datamodule, whitening)
            trainer.save_checkpoint(output_dir / "checkpoints" / "whitened.ckpt", weights_only=True)
            tested[f"fine_tuned+{whitening.kind}"] = test(module, cfg, f"fine_tuned+{whitening.kind}")
        report = {"best_checkpoint": best or None, "off_the_shelf_val/mAP": off_the_shelf_val,
                  "best_val/mAP": _float(trainer.checkpoint_callback.best_model_score)
                  if trainer.checkpoint_callback else None,
                  "test": {variant: {name: {k: s.get(k) for k in ("mAP", "class_mAP")} for name, s in results.items()}
                           for variant, results in tested.items()}}
        for logger in loggers:
            logger.log_metrics({f"test/{name}/{variant}/{metric}": value
                                for variant, results in report["test"].items()
                                for name, scores in results.items() for metric, value in scores.items()
                                if value is not None})
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_summary.json").write_text(json.dumps(report, indent=2))
        _print_report(report)
    return report


def _float(value) -> float | None:
    return None if value is None else float(value)


def _print_report(report: dict) -> None:
    print(f"\nval/mAP off-the-shelf {report['off_the_shelf_val/mAP']}, best fine-tuned {report['best_val/mAP']} "
          f"({report['best_checkpoint']})")
    for variant, results in report["test"].items():
        for name, scores in results.items():
            print(f"test {name:<24} {variant:<22} mAP {scores['mAP']:.4f}   class mAP {scores['class_mAP']:.4f}")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Run one fine-tuning; returns the best validation mAP so that Hydra sweepers can optimise it."""
    keep_freed_memory()
    os.environ.setdefault("WANDB_SILENT", "true")
    empty_dict_overrides(cfg, HydraConfig.get().overrides.task)  # `test.datasets={}`: no test set at all
    try:
        check_entry_point(cfg, "hetretrieval-train")
        report = train(cfg)
    except HetRetrievalError as error:
        raise SystemExit(f"hetretrieval: {error}") from None
    return report["best_val/mAP"]


if __name__ == "__main__":
    main()
