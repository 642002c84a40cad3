"""`hetretrieval-eval`: off-the-shelf retrieval evaluation of backbone x pooling x dataset (Hydra entry point)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from hetretrieval.callbacks.evaluation import RetrievalEvaluation
from hetretrieval.callbacks.local_evaluation import LocalRetrievalEvaluation
from hetretrieval.config import CONFIG_DIR, EvaluationOptions, ExtractionOptions, instantiate, typed
from hetretrieval.data.datamodule import RetrievalDataModule
from hetretrieval.errors import ConfigError, HetRetrievalError
from hetretrieval.index.local import LocalSearchOptions
from hetretrieval.models.factory import build_head
from hetretrieval.models.local.pipeline import LOCAL_EXTRACTORS, LocalFeatureModule
from hetretrieval.models.module import RetrievalModule, load_for_evaluation

log = logging.getLogger(__name__)


def build_loggers(cfg: DictConfig, run_name: str) -> list:
    """Instantiate every logger of the `logger` group; W&B runs are named after the descriptor and dataset."""
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        is_wandb = node.get("_target_", "").endswith("WandbLogger")
        loggers.append(instantiate(node, **({"name": run_name} if is_wandb and not node.get("name") else {})))
    return loggers


def finish_loggers(loggers: list) -> None:
    """Close W&B runs so that each run of a multirun is its own, complete W&B run."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger" and logger._experiment is not None:
            logger.experiment.finish()


def evaluate(cfg: DictConfig) -> dict:
    """Build everything from the config (failing fast on bad values), extract, evaluate; returns the summary."""
    extraction = typed(cfg.extraction, ExtractionOptions, "extraction")
    evaluation = typed(cfg.evaluation, EvaluationOptions, "evaluation")
    pl.seed_everything(cfg.seed, workers=True)
    dataset = instantiate(cfg.dataset)
    datamodule = RetrievalDataModule(dataset, extraction.max_size, extraction.batch_size, extraction.num_workers)
    if cfg.get("checkpoint"):  # a fine-tuned model from hetretrieval-train (backbone/pooling groups unused)
        module = load_for_evaluation(cfg.checkpoint, extraction.scales)
    else:
        backbone = instantiate(cfg.backbone)
        head = build_head(cfg.pooling, backbone)
        module = head if isinstance(head, LOCAL_EXTRACTORS) else RetrievalModule(backbone, head, extraction.scales)
        if hasattr(head, "prepare"):  # data-initialised heads (NetVLAD) learn from the images before extraction
            datamodule.setup()
            head.prepare(backbone.eval(), datamodule)
    output_dir = Path(cfg.paths.output_dir)
    rerank = cfg.get("rerank")
    if isinstance(module, LOCAL_EXTRACTORS) or rerank:
        search = typed(OmegaConf.create(OmegaConf.to_container(cfg.local_search, resolve=True)),
                       LocalSearchOptions, "local_search")
        if rerank and isinstance(module, LOCAL_EXTRACTORS):
            raise ConfigError(f"rerank re-ranks a global descriptor's ranking, not pooling={module.name}")
        if rerank:
            module = LocalFeatureModule(build_head(rerank.local, module.backbone), global_module=module)
        else:
            module = LocalFeatureModule(module)
        callback = LocalRetrievalEvaluation(output_dir, instantiate(cfg.verification), search,
                                            rerank.top_k if rerank else None, evaluation.ks, evaluation.top_k,
                                            evaluation.max_batch_entries, report=evaluation.report)
    else:
        callback = RetrievalEvaluation(output_dir, evaluation.ks, evaluation.top_k, evaluation.max_batch_entries,
                                       report=evaluation.report)
    loggers = build_loggers(cfg, f"{module.descriptor_name}-{dataset.name}")
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=[callback], logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
    finally:
        finish_loggers(loggers)
    return callback.summary


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def main(cfg: DictConfig) -> float | None:
    """Run one evaluation; returns mAP so that Hydra sweepers can optimise it."""
    os.environ.setdefault("WANDB_SILENT", "true")
    # our size-bucket sampler returns every index (tested); Lightning cannot know and warns on every run
    warnings.filterwarnings("ignore", message=".*custom batch sampler.*")
    try:
        summary = evaluate(cfg)
    except HetRetrievalError as error:
        raise SystemExit(f"hetretrieval: {error}") from None
    return summary["mAP"] if summary else None


if __name__ == "__main__":
    main()
