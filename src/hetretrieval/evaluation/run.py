"""One home for evaluation: an `Extraction` in, every head scored, its run folder written, reported and logged.

`RunEvaluation` is what rank 0 runs once the engine has gathered the descriptors. Each step is its own piece:
cache the fresh descriptors (`extraction.store`), score with one search (`scoring`), write the run files
atomically with `summary.json` last (`run_files`), then report, log and print (`publish`). With several heads,
each gets `<output>/<head>/` (a complete run folder, one W&B run, all grouped under the parent run) and the
root gets the Table 3-style comparison of the heads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from hetretrieval.config import EvaluationOptions
from hetretrieval.data.datasets import RetrievalDataset
from hetretrieval.evaluation.publish import log_run, print_run, write_report
from hetretrieval.evaluation.run_files import per_class_rows, write_json, write_run
from hetretrieval.evaluation.scoring import LocalScoring, Scored, score_global, score_local
from hetretrieval.extraction.batching import ImageSource
from hetretrieval.extraction.engine import Extraction, ExtractionEngine
from hetretrieval.extraction.store import CachedHeads
from hetretrieval.loggers import build_loggers, logged_run, task_overrides
from hetretrieval.models.local.features import save_local_features

log = logging.getLogger(__name__)

REVISITED = "revisited.json"
LOCAL_FEATURES = "local_features.npz"


@dataclass(frozen=True)
class HeadSpec:
    """One descriptor of a run: `name` (its key in the extraction and its folder), `descriptor` (its name in
    tables), `local` (searched by local matching), `rerank` (the local head re-ranking this global one),
    `pca_dim` (local PCA at search time) and `facts` (what summary.json says of it), `config` (its node)."""

    name: str
    descriptor: str
    local: bool = False
    rerank: str | None = None
    pca_dim: int | None = None
    facts: Mapping = field(default_factory=dict)
    config: Mapping = field(default_factory=dict)


class RunEvaluation:
    """Score, write, report and log every head of an extraction (see the module docstring)."""

    def __init__(self, output_dir: str | Path, dataset: RetrievalDataset, heads: Sequence[HeadSpec],
                 options: EvaluationOptions, facts: Mapping, local_scoring: LocalScoring | None = None,
                 cache: CachedHeads | None = None, cfg: DictConfig | None = None, show_classes: int = 10) -> None:
        self.output_dir, self.dataset, self.heads = Path(output_dir), dataset, list(heads)
        self.options, self.facts, self.local_scoring, self.cache = options, dict(facts), local_scoring, cache
        self.cfg, self.show_classes = cfg, show_classes
        self.summaries: dict[str, dict] = {}

    def run_dir(self, head: HeadSpec) -> Path:
        return self.output_dir / head.name if len(self.heads) > 1 else self.output_dir

    def __call__(self, fresh: Extraction | None) -> dict[str, dict]:
        """Evaluate `fresh` descriptors merged with the cached ones; returns each head's summary."""
        extraction = self.cache.complete(fresh) if self.cache is not None else fresh
        for head in self.heads:
            self.summaries[head.name] = self.evaluate_head(head, extraction)
        if len(self.heads) > 1:
            self.compare()
        return self.summaries

    def evaluate_head(self, head: HeadSpec, extraction: Extraction) -> dict:
        run_dir = self.run_dir(head)
        started = time.perf_counter()
        scored = self.score(head, extraction)
        info = {
            "descriptor": head.descriptor, **self.facts,
            "dim": int(extraction.descriptors[head.name].shape[1]) if head.name in extraction.descriptors else 0,
            "descriptor_cache": self.cache.status(head.name) if self.cache is not None else "miss", **head.facts,
            "timings": {"extraction_s": round(extraction.seconds, 3),  # reading the store, on a cache hit
                        "images_per_s": None if self._cached(head) else round(extraction.images_per_second, 2),
                        "search_and_metrics_s": round(time.perf_counter() - started, 3)},
            **scored.info, **(scored.revisited or {}),
            "overrides": task_overrides(),  # what names the run among others (hetretrieval.loggers)
        }
        descriptors = extraction.descriptors.get(head.name, np.zeros((len(self.dataset), 0), np.float32))
        run_dir.mkdir(parents=True, exist_ok=True)
        if scored.revisited is not None:
            write_json(run_dir / REVISITED, scored.revisited)
        if scored.local_features is not None:
            save_local_features(run_dir / LOCAL_FEATURES, scored.local_features)
        summary = write_run(run_dir, self.dataset, scored.results, descriptors, extraction.valid,
                            extraction.skipped, info, self.options.ks)
        report = write_report(run_dir) if self.options.report else {}
        rows = per_class_rows(self.dataset, scored.results)
        if self.cfg is not None:
            self.log(head, run_dir, summary, rows, report)
        print_run(summary, rows, self.options.ks, run_dir, self.show_classes)
        return summary

    def _cached(self, head: HeadSpec) -> bool:
        return self.cache is not None and self.cache.status(head.name) == "hit"

    def score(self, head: HeadSpec, extraction: Extraction) -> Scored:
        if head.local:
            features = extraction.local_features[head.name]
            return score_local(features, extraction.valid, self.dataset, self.options, self.local_scoring,
                               head.pca_dim)
        rerank = None
        if head.rerank is not None:
            rerank = (extraction.local_features[head.rerank], self.local_scoring)
        return score_global(extraction.descriptors[head.name], extraction.valid, self.dataset, self.options,
                            rerank)

    def log(self, head: HeadSpec, run_dir: Path, summary: Mapping, rows: Sequence[Mapping],
            report: Mapping[str, Path]) -> None:
        """One logger set (one W&B run) per head, grouped under the parent run when there are several (in a
        multirun: under the multirun, see `build_loggers`)."""
        several = len(self.heads) > 1
        name = f"{head.descriptor}-{self.dataset.name}"
        loggers = build_loggers(self.cfg, name, save_dir=str(run_dir) if several else None,
                                group=self.output_dir.name if several else None,
                                head=head.descriptor if several else None)
        with logged_run(loggers):
            hyperparameters = OmegaConf.to_container(self.cfg, resolve=True)
            hyperparameters["pooling"] = dict(head.config)
            for logger in loggers:
                logger.log_hyperparams(hyperparameters)
            log_run(loggers, summary, rows, report)

    def compare(self) -> None:
        """comparison.csv / comparison.md (and the heatmaps) of every head, at the run's root."""
        from hetretrieval.analysis.comparison import compare_runs

        directories = [self.run_dir(h) for h in self.heads if h.name in self.summaries]
        try:
            paths = compare_runs(directories, annotations="auto").write(self.output_dir)
        except Exception as error:  # noqa: BLE001 - every head's results are saved already
            log.warning("could not write the comparison of the heads (%s: %s)", type(error).__name__, error)
            return
        print(f"comparison of {len(directories)} heads: {paths['markdown']}")


def evaluate_engine(engine: ExtractionEngine, dataset: RetrievalDataset, source: ImageSource, output_dir: str | Path,
                    options: EvaluationOptions, descriptors: Mapping[str, str] | None = None) -> dict[str, dict]:
    """Describe `dataset` with `engine` in this process (on the engine's device) and evaluate every head, as
    `hetretrieval-eval` does; `descriptors` names the heads in tables (default: their keys)."""
    extraction = engine.extract(dataset.records, source)
    network = engine.network
    specs = [HeadSpec(name, (descriptors or {}).get(name, name)) for name in engine.head_names]
    facts = {"backbone": getattr(network.backbone, "model_name", None) if network is not None else None,
             "scales": list(network.scales) if network is not None else [1.0], "max_size": source.max_size,
             "device": str(engine.device)}
    return RunEvaluation(output_dir, dataset, specs, options, facts)(extraction)
