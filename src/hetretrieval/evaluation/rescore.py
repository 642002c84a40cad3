"""`hetretrieval-eval from_run=<run dir>`: re-score a run's saved descriptors, without a model or an image.

Another `evaluation.*` (ks, top_k, max_batch_entries) or other `dataset.query` / `dataset.database` selectors
over the same images give new run files, scored exactly as a fresh run would be. A multi-head run's folder
re-scores every head.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from hetretrieval.analysis.results import DESCRIPTORS, SUMMARY, load_images, load_run
from hetretrieval.config import EvaluationOptions
from hetretrieval.data.datasets import RetrievalDataset, make_dataset
from hetretrieval.errors import DataError
from hetretrieval.evaluation.run import LOCAL_FEATURES, HeadSpec, RunEvaluation
from hetretrieval.extraction.engine import Extraction

RUN_FACTS = ("backbone", "scales", "max_size", "device")


def rescore_run(run: str | Path, output_dir: Path, options: EvaluationOptions, cfg: DictConfig | None = None) -> dict:
    """Score the descriptors saved in `run` again with `options` (and `cfg.dataset`'s selectors, if set);
    returns the summary (or `{head: summary}` for a multi-head run)."""
    run = Path(run).expanduser()
    head_dirs = {None: run} if (run / SUMMARY).is_file() else {
        p.name: p for p in sorted(run.iterdir()) if (p / SUMMARY).is_file()} if run.is_dir() else {}
    if not head_dirs:
        raise DataError(f"from_run: '{run}' is not a run folder (no {SUMMARY}, nor head folders holding one)")
    saved_runs = {name: load_run(path) for name, path in head_dirs.items()}
    for name, path in head_dirs.items():
        if (path / LOCAL_FEATURES).is_file():
            raise DataError(f"from_run re-scores global descriptors; '{path}' holds local features "
                            f"({saved_runs[name].descriptor}): run it again instead")
    first = next(iter(head_dirs.values()))
    dataset = _dataset(first, next(iter(saved_runs.values())).summary.get("dataset", "from_run"), cfg)
    images = load_images(first)
    skipped = {i: reason for i, reason in _skipped(saved_runs.values(), dataset).items()}
    extraction = Extraction(images.described, skipped)
    specs = []
    for name, path in head_dirs.items():
        summary = saved_runs[name].summary
        key = name or str(summary.get("descriptor", "head"))
        descriptors = np.load(path / DESCRIPTORS, allow_pickle=False)
        if descriptors.shape[0] != len(dataset):
            raise DataError(f"from_run: '{path / DESCRIPTORS}' has {descriptors.shape[0]} rows for "
                            f"{len(dataset)} images")
        extraction.descriptors[key] = descriptors
        specs.append(HeadSpec(key, str(summary.get("descriptor", key)),
                              facts={**{k: summary.get(k) for k in RUN_FACTS if k in summary},
                                     "descriptor_cache": "from_run", "from_run": str(path)}))
    summaries = RunEvaluation(output_dir, dataset, specs, options, {}, cfg=cfg)(extraction)
    return next(iter(summaries.values())) if len(summaries) == 1 else summaries


def _dataset(run_dir: Path, name: str, cfg: DictConfig | None) -> RetrievalDataset:
    """The run's images with its own query/database roles, or the selectors `cfg.dataset` sets."""
    images = load_images(run_dir)
    selectors = {key: (OmegaConf.to_container(cfg.dataset[key], resolve=True) if cfg is not None
                       and cfg.get("dataset") is not None and cfg.dataset.get(key) is not None else None)
                 for key in ("query", "database")}
    if any(value is not None for value in selectors.values()):
        return make_dataset(name, images.records, selectors["query"], selectors["database"])
    return RetrievalDataset(name, images.records, np.flatnonzero(images.query), np.flatnonzero(images.database))


def _skipped(runs, dataset: RetrievalDataset) -> dict[int, str]:
    """The skipped images the run reported, by record index."""
    index_of = {str(record.path): i for i, record in enumerate(dataset.records)}
    return {index_of[entry["path"]]: entry["reason"] for run in runs for entry in run.summary.get("skipped", [])
            if entry["path"] in index_of}
