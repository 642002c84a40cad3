"""Retrieval evaluation inside training, by the evaluator of ``hetretrieval-eval``.

Validation scores descriptors with ``metrics.retrieval.evaluate_retrieval`` and breaks mAP down per class and,
when records carry a ``domain``, per (query domain -> database domain) pair. Testing runs the evaluation
callback of ``hetretrieval-eval`` itself on a module, writing the same result files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytorch_lightning as pl

from hetretrieval.callbacks.evaluation import RetrievalEvaluation
from hetretrieval.data.datamodule import RetrievalDataModule
from hetretrieval.data.datasets import RetrievalDataset
from hetretrieval.metrics.retrieval import evaluate_retrieval


def retrieval_metrics(descriptors: np.ndarray, valid: np.ndarray, dataset: RetrievalDataset,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """``(N, D)`` descriptors, ``(N,)`` valid -> ``mAP``, ``class_mAP``, ``mP@k``, ``class_mAP/<label>`` and
    ``mAP/<query domain>-><database domain>`` (NaN-free: classes and pairs without positives are left out)."""
    results = evaluate_retrieval(descriptors, dataset, valid, ks, top_k=1)
    metrics = {"mAP": results.mean_average_precision, "class_mAP": results.class_mean_average_precision}
    metrics.update({f"mP@{k}": results.mean_precision_at(k) for k in ks})
    metrics.update({f"class_mAP/{label}": m for label, (n, m) in results.per_class.items() if n})
    domains = np.array([record.metadata.get("domain") for record in dataset.records], dtype=object)
    for query_domain in sorted({d for d in domains[dataset.query_ids] if d is not None}):
        for database_domain in sorted({d for d in domains[dataset.database_ids] if d is not None}):
            pair = replace(dataset, query_ids=dataset.query_ids[domains[dataset.query_ids] == query_domain],
                           database_ids=dataset.database_ids[domains[dataset.database_ids] == database_domain])
            pair_map = evaluate_retrieval(descriptors, pair, valid, ks, top_k=1).mean_average_precision
            metrics[f"mAP/{query_domain}->{database_domain}"] = pair_map
    return {name: float(value) for name, value in metrics.items() if np.isfinite(value)}


def evaluate_module(module: pl.LightningModule, dataset: RetrievalDataset, output_dir: str | Path,
                    max_size: int | None, batch_size: int = 16, ks: Sequence[int] = (1, 5, 10), top_k: int = 100,
                    num_workers: int = 0, accelerator: str = "auto", report: bool = True) -> dict:
    """Extract and evaluate ``dataset`` with ``module`` as ``hetretrieval-eval`` does; returns ``summary.json``'s
    content (result files written to ``output_dir``)."""
    callback = RetrievalEvaluation(output_dir, ks, top_k, report=report)
    trainer = pl.Trainer(accelerator=accelerator, devices=1, logger=False, callbacks=[callback],
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                         use_distributed_sampler=False, inference_mode=True)
    datamodule = RetrievalDataModule(dataset, max_size, batch_size, num_workers)
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    return callback.summary
