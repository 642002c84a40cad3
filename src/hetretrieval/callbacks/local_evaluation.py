"""The evaluation callback for local features: local search (DELF, ORB) or re-ranking of a global ranking.

Same outputs as `RetrievalEvaluation` (summary.json, per-class / per-query CSVs, loggers), with the rankings
produced by `hetretrieval.index.local` and scored by the one evaluator, `evaluate_rankings`. It adds
`local_features.npz` (the features of every described image, in record order: see images.csv) and, for the
local search, the descriptor index's memory (PQ codes vs. flat descriptors) in the summary.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl

from hetretrieval.analysis.results import write_run
from hetretrieval.callbacks.evaluation import RetrievalEvaluation, _all_gather, merge_gathered
from hetretrieval.index.local import (
    LocalSearchOptions,
    build_descriptor_index,
    index_memory,
    local_rankings,
    reduce_dimension,
    rerank_rankings,
    stack_descriptors,
)
from hetretrieval.index.search import iter_rankings
from hetretrieval.metrics.retrieval import evaluate_rankings, search_protocol
from hetretrieval.models.local.features import LocalFeatures, save_local_features
from hetretrieval.models.local.ransac import GeometricVerifier

LOCAL_FEATURES = "local_features.npz"


class LocalRetrievalEvaluation(RetrievalEvaluation):
    """Evaluate `LocalFeatureModule` predictions: local search, or re-ranking when `rerank_top_k` is set."""

    def __init__(self, output_dir: str | Path, verifier: GeometricVerifier, search: LocalSearchOptions,
                 rerank_top_k: int | None = None, ks: Sequence[int] = (1, 5, 10), top_k: int = 100,
                 max_batch_entries: int = 1 << 24, report: bool = True) -> None:
        super().__init__(output_dir, ks, top_k, max_batch_entries, report)
        self.verifier = verifier
        self.search = search
        self.rerank_top_k = rerank_top_k

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_predict_epoch_start(trainer, pl_module)
        self._features: dict[int, LocalFeatures] = {}

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        for index, features in zip(outputs["index"].tolist(), outputs["features"], strict=True):
            self._features.setdefault(int(index), features)

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        extraction_seconds = time.perf_counter() - self._started
        local = (np.concatenate(self._indices) if self._indices else np.zeros(0, np.int64),
                 np.concatenate(self._descriptors) if self._descriptors else np.zeros((0, 0), np.float32))
        gathered = _all_gather((local, self._failed, self._features))
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        dataset = datamodule.dataset
        descriptors, valid = merge_gathered([part for part, _, _ in gathered], len(dataset))
        features: dict[int, LocalFeatures] = {}
        skipped = dict(datamodule.unreadable)
        for _, failed, part in gathered:
            skipped.update(failed)
            for index, value in part.items():
                features.setdefault(index, value)
        for index in np.flatnonzero(~valid):
            skipped.setdefault(int(index), "not extracted (prediction stopped early: fast_dev_run or a batch limit)")

        started = time.perf_counter()
        described = np.flatnonzero(valid)
        pca_dim = getattr(pl_module.extractor, "pca_dim", None)
        protocol = search_protocol(dataset, valid)
        if pca_dim is not None:
            reduced = reduce_dimension([features[i] for i in described],
                                       [features[i] for i in protocol.database_ids], pca_dim)
            features = dict(zip(described.tolist(), reduced, strict=True))
        queries = [features[i] for i in protocol.query_ids]
        database = [features[i] for i in protocol.database_ids]
        info = {"descriptor": pl_module.descriptor_name, "backbone": pl_module.backbone_name,
                "local_features": pl_module.extractor.name, "scorer": pl_module.scorer_name,
                "local_dim": int(database[0].descriptors.shape[1]) if database else 0,
                "mean_keypoints": round(float(np.mean([len(features[i]) for i in described])), 1)}
        if self.rerank_top_k is not None:
            global_rankings = iter_rankings(descriptors[protocol.query_ids], descriptors[protocol.database_ids],
                                            protocol.exclude, self.max_batch_entries)
            rankings = rerank_rankings(global_rankings, queries, database, self.verifier, self.rerank_top_k,
                                       self.search.mutual, self.search.ratio)
            info["rerank_top_k"] = self.rerank_top_k
        else:
            stacked, _ = stack_descriptors(database)
            index = build_descriptor_index(stacked, self.search)
            info["local_index"] = index_memory(index, stacked)
            rankings = local_rankings(queries, database, protocol.exclude, self.verifier, self.search, index)
            info["shortlist"] = self.search.shortlist
        self.results = evaluate_rankings(rankings, dataset, protocol, self.ks, self.top_k)
        info.update({
            "dim": int(descriptors.shape[1]),
            "scales": list(pl_module.scales),
            "max_size": datamodule.max_size,
            "device": str(pl_module.device),
            "timings": {"extraction_s": round(extraction_seconds, 3),
                        "images_per_s": round(int(valid.sum()) / max(extraction_seconds, 1e-9), 2),
                        "search_and_metrics_s": round(time.perf_counter() - started, 3)},
        })
        self.summary = write_run(self.output_dir, dataset, self.results, descriptors, valid, skipped, info, self.ks)
        save_local_features(self.output_dir / LOCAL_FEATURES, [features[i] for i in described])
        self._log(trainer, dataset, self._write_report() if self.report else {})
        self._print(dataset)
