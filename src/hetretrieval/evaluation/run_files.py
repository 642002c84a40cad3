"""A run's folder: claimed at start-up, result files written atomically, `summary.json` last.

`claim_output_dir` runs before any weight or image is read: it fails in one line when the folder cannot be
written or another running process holds it, and moves a finished run's results aside so that one folder never
mixes two runs. `write_run` writes each file under a temporary name and renames it into place, the summary
last, so a reader (or `hetretrieval-analyze`) either sees a complete run or no `summary.json` at all.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from hetretrieval.analysis.results import (
    DESCRIPTORS,
    IMAGES,
    NEIGHBOURS,
    PER_CLASS,
    PER_QUERY,
    SUMMARY,
    SUPERSEDED,
)
from hetretrieval.data.datasets import RetrievalDataset
from hetretrieval.errors import DataError
from hetretrieval.files import atomic_write, write_csv, write_npy
from hetretrieval.metrics.retrieval import RetrievalResults, metric_summary

log = logging.getLogger(__name__)

LOCK = ".hetretrieval.lock"
RESULT_NAMES = (SUMMARY, PER_CLASS, PER_QUERY, IMAGES, DESCRIPTORS, NEIGHBOURS, "revisited.json",
                "local_features.npz", "report", "comparison.csv", "comparison.md")


def claim_output_dir(output_dir: str | Path) -> Path:
    """Make `output_dir` this run's: writable, locked by this process, and holding no earlier results."""
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        lock = output_dir / LOCK
        holder = _lock_holder(lock)
        if holder is not None and holder != os.getpid():
            raise DataError(f"output folder '{output_dir}' is in use by running process {holder}")
        lock.write_text(str(os.getpid()))
    except OSError as error:
        raise DataError(f"cannot write to the output folder '{output_dir}' ({error.strerror or error})") from None
    earlier = [p for p in output_dir.iterdir() if p.name in RESULT_NAMES
               or ((p / SUMMARY).is_file() and not p.name.startswith(SUPERSEDED))]
    if earlier:
        aside = _aside(output_dir)
        for path in earlier:
            shutil.move(str(path), aside / path.name)
        log.warning("'%s' held an earlier run's results: moved them to %s", output_dir, aside)
    return output_dir


def _aside(output_dir: Path) -> Path:
    """A new `superseded-<time>` folder for the earlier results (numbered when runs start within one second)."""
    stamp = f"{SUPERSEDED}{time.strftime('%Y%m%d-%H%M%S')}"
    aside, number = output_dir / stamp, 1
    while aside.exists():
        number += 1
        aside = output_dir / f"{stamp}-{number}"
    aside.mkdir()
    return aside


def release_output_dir(output_dir: str | Path) -> None:
    """Drop this process's lock on `output_dir` (if it holds it)."""
    lock = Path(output_dir) / LOCK
    if _lock_holder(lock) == os.getpid():
        lock.unlink(missing_ok=True)


def _lock_holder(lock: Path) -> int | None:
    """The live process holding `lock`, or None (no lock, or a stale one left by a dead process)."""
    try:
        pid = int(lock.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def write_json(path: Path, content: Mapping) -> Path:
    return atomic_write(path, lambda p: p.write_text(json.dumps(content, indent=2, default=str), encoding="utf-8"))


def _write_csv(path: Path, rows: Sequence[Mapping], fieldnames: Sequence[str]) -> None:
    """Dict `rows` under `fieldnames` (a missing key is an empty cell, other keys are left out)."""
    write_csv(path, fieldnames, ([row.get(name, "") for name in fieldnames] for row in rows))


def metadata_columns(dataset: RetrievalDataset) -> list[str]:
    return sorted({key for record in dataset.records for key in record.metadata})


def class_metadata(dataset: RetrievalDataset, label: str) -> dict[str, str]:
    """Metadata values shared by every image of a class (e.g. a class-level annotation)."""
    records = [r for r in dataset.records if r.label == label]
    keys = set.intersection(*(set(r.metadata) for r in records)) if records else set()
    return {k: records[0].metadata[k] for k in sorted(keys) if len({r.metadata[k] for r in records}) == 1}


def per_class_rows(dataset: RetrievalDataset, results: RetrievalResults) -> list[dict]:
    """class, n_queries, mAP (None where undefined) and the metadata constant within the class."""
    return [{"class": label, "n_queries": n, "mAP": None if m != m else round(float(m), 6),
             **class_metadata(dataset, label)} for label, (n, m) in results.per_class.items()]


def _rounded(value: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value), 6)


def write_run(output_dir: Path, dataset: RetrievalDataset, results: RetrievalResults, descriptors: np.ndarray,
              valid: np.ndarray, skipped: Mapping[int, str], info: Mapping, ks: Sequence[int]) -> dict:
    """Write every result file of a run, `summary.json` last; returns the summary dictionary."""
    output_dir.mkdir(parents=True, exist_ok=True)
    meta = metadata_columns(dataset)
    records = dataset.records

    class_rows = per_class_rows(dataset, results)
    class_meta = sorted({k for row in class_rows for k in row} - {"class", "n_queries", "mAP"})
    _write_csv(output_dir / PER_CLASS, class_rows, ["class", "n_queries", "mAP", *class_meta])

    query_rows = []
    for row, record_id in enumerate(results.query_ids):
        record = records[record_id]
        query_rows.append({
            "image_id": int(record_id), "path": str(record.path), "label": record.label,
            "ap": _rounded(results.ap[row]), "n_positives": int(results.n_positives[row]),
            **{f"P@{k}": _rounded(results.precision[k][row]) for k in ks},
            **{f"R@{k}": _rounded(results.recall[k][row]) for k in ks},
            **record.metadata,
        })
    _write_csv(output_dir / PER_QUERY, query_rows,
               ["image_id", "path", "label", "ap", "n_positives", *[f"P@{k}" for k in ks],
                *[f"R@{k}" for k in ks], *meta])

    is_query = np.zeros(len(records), dtype=bool)
    is_query[dataset.query_ids] = True
    in_database = np.zeros(len(records), dtype=bool)
    in_database[dataset.database_ids] = True
    _write_csv(output_dir / IMAGES, [
        {"image_id": i, "path": str(r.path), "label": r.label or "", "query": int(is_query[i]),
         "database": int(in_database[i]), "described": int(valid[i]), **r.metadata}
        for i, r in enumerate(records)], ["image_id", "path", "label", "query", "database", "described", *meta])
    write_npy(output_dir / DESCRIPTORS, descriptors.astype(np.float32))
    write_npy(output_dir / NEIGHBOURS, results.neighbours)

    summary = {
        **metric_summary(results, ks),
        **info,
        "dataset": dataset.name,
        "counts": {"images": len(records), "described": int(valid.sum()), "queries": int(results.query_ids.size),
                   "evaluated_queries": int(results.evaluated.sum()), "database": int(results.database_ids.size),
                   "classes": len(results.per_class), "skipped": len(skipped)},
        "excluded_queries": [str(records[i].path) for i in results.excluded_queries],
        "skipped": [{"path": str(records[i].path), "reason": reason} for i, reason in sorted(skipped.items())],
    }
    write_json(output_dir / SUMMARY, summary)
    return summary
