"""The evaluation callback for local features: local search (DELF, ORB) or re-ranking of a global ranking.

Same outputs as `RetrievalEvaluation` (summary.json, per-class / per-query CSVs, loggers), with the rankings
produced by `hetretrieval.index.local` and scored by the one evaluator, `evaluate_rankings`. It adds
`local_features.npz` (the features of every described image, in record order: see images.csv) and, for the
local search, the descriptor index's memory (PQ codes vs. flat descriptors) in the summary.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl

from hetretrieval.callbacks.evaluation import RetrievalEvaluation
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
from hetretrieval.metrics.retrieval import RetrievalResults, evaluate_rankings, search_protocol
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

    def _rank_state(self) -> tuple:
        return (*super()._rank_state(), self._features)

    def _score(self, descriptors: np.ndarray, valid: np.ndarray, dataset, pl_module, gathered: list
               ) -> tuple[RetrievalResults, dict]:
        """Local search by votes then spatial verification, or re-ranking of the global ranking's top-k."""
        features: dict[int, LocalFeatures] = {}
        for state in gathered:
            for index, value in state[2].items():
                features.setdefault(index, value)
        described = np.flatnonzero(valid)
        pca_dim = getattr(pl_module.extractor, "pca_dim", None)
        protocol = search_protocol(dataset, valid)
        if pca_dim is not None:
            reduced = reduce_dimension([features[i] for i in described],
                                       [features[i] for i in protocol.database_ids], pca_dim)
            features = dict(zip(described.tolist(), reduced, strict=True))
        self._described_features = [features[i] for i in described]
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
        return evaluate_rankings(rankings, dataset, protocol, self.ks, self.top_k), info

    def _write_extras(self, dataset, descriptors: np.ndarray, valid: np.ndarray) -> None:
        save_local_features(self.output_dir / LOCAL_FEATURES, self._described_features)
