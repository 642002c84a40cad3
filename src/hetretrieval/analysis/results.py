"""A run's results on disk: written once by the evaluation, read back by every analysis (no re-extraction).

Files in the run directory:
- `summary.json`: config, descriptor, dataset, mAP, class_mAP, mP@k / mR@k, counts, timings, skipped images;
- `per_class_map.csv`: class, n_queries, mAP, plus metadata constant within the class;
- `per_query_ap.csv`: one row per query (AP, P@k, R@k, positives, the image's metadata);
- `descriptors.npy` + `images.csv`: one descriptor row per image (zeros where skipped), with path/label/metadata;
- `neighbours.npy`: the top-k database record ids of each query, in `per_query_ap.csv` order.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hetretrieval.data.datasets import ImageRecord, RetrievalDataset
from hetretrieval.errors import DataError
from hetretrieval.metrics.retrieval import RetrievalResults

SUMMARY = "summary.json"
PER_CLASS = "per_class_map.csv"
PER_QUERY = "per_query_ap.csv"
IMAGES = "images.csv"
DESCRIPTORS = "descriptors.npy"
NEIGHBOURS = "neighbours.npy"


def _finite_or_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


def _write_csv(path: Path, rows: Sequence[Mapping], fieldnames: Sequence[str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fieldnames), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def metadata_columns(dataset: RetrievalDataset) -> list[str]:
    return sorted({key for record in dataset.records for key in record.metadata})


def class_metadata(dataset: RetrievalDataset, label: str) -> dict[str, str]:
    """Metadata values shared by every image of a class (e.g. a class-level annotation)."""
    records = [r for r in dataset.records if r.label == label]
    keys = set.intersection(*(set(r.metadata) for r in records)) if records else set()
    return {k: records[0].metadata[k] for k in sorted(keys) if len({r.metadata[k] for r in records}) == 1}


def summarise(results: RetrievalResults, ks: Sequence[int]) -> dict:
    """The scalar metrics of a run, as logged and written to `summary.json`."""
    summary = {"mAP": _finite_or_none(results.mean_average_precision),
               "class_mAP": _finite_or_none(results.class_mean_average_precision)}
    for k in ks:
        summary[f"mP@{k}"] = _finite_or_none(results.mean_precision_at(k))
        summary[f"mR@{k}"] = _finite_or_none(results.mean_recall_at(k))
    return summary


def write_run(
    output_dir: Path, dataset: RetrievalDataset, results: RetrievalResults, descriptors: np.ndarray,
    valid: np.ndarray, skipped: Mapping[int, str], info: Mapping, ks: Sequence[int],
) -> dict:
    """Write every result file of a run; returns the summary dictionary."""
    output_dir.mkdir(parents=True, exist_ok=True)
    meta = metadata_columns(dataset)
    records = dataset.records

    per_class_rows = [{"class": label, "n_queries": n, "mAP": _finite_or_none(m), **class_metadata(dataset, label)}
                      for label, (n, m) in results.per_class.items()]
    class_meta = sorted({k for row in per_class_rows for k in row} - {"class", "n_queries", "mAP"})
    _write_csv(output_dir / PER_CLASS, per_class_rows, ["class", "n_queries", "mAP", *class_meta])

    query_rows = []
    for row, record_id in enumerate(results.query_ids):
        record = records[record_id]
        query_rows.append({
            "image_id": int(record_id), "path": str(record.path), "label": record.label,
            "ap": _finite_or_none(results.ap[row]), "n_positives": int(results.n_positives[row]),
            **{f"P@{k}": _finite_or_none(results.precision[k][row]) for k in ks},
            **{f"R@{k}": _finite_or_none(results.recall[k][row]) for k in ks},
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
    np.save(output_dir / DESCRIPTORS, descriptors.astype(np.float32))
    np.save(output_dir / NEIGHBOURS, results.neighbours)

    summary = {
        **summarise(results, ks),
        **info,
        "dataset": dataset.name,
        "counts": {"images": len(records), "described": int(valid.sum()), "queries": int(results.query_ids.size),
                   "evaluated_queries": int(results.evaluated.sum()), "database": int(results.database_ids.size),
                   "classes": len(results.per_class), "skipped": len(skipped)},
        "excluded_queries": [str(records[i].path) for i in results.excluded_queries],
        "skipped": [{"path": str(records[i].path), "reason": reason} for i, reason in sorted(skipped.items())],
    }
    (output_dir / SUMMARY).write_text(json.dumps(summary, indent=2, default=str))
    return summary


@dataclass(frozen=True)
class SavedRun:
    """A run read back from disk: its summary and per-class / per-query tables as lists of dicts."""

    directory: Path
    summary: dict
    per_class: list[dict]
    per_query: list[dict]

    @property
    def descriptor(self) -> str:
        return str(self.summary.get("descriptor", self.directory.name))

    def descriptors(self) -> np.ndarray:
        return np.load(self.directory / DESCRIPTORS)


def load_run(directory: str | Path) -> SavedRun:
    """Read a run directory written by `write_run`; DataError if it is not one."""
    directory = Path(directory)
    if not (directory / SUMMARY).is_file():
        raise DataError(f"'{directory}' is not a hetretrieval run directory (no {SUMMARY})")
    with (directory / PER_CLASS).open(newline="") as handle:
        per_class = list(csv.DictReader(handle))
    with (directory / PER_QUERY).open(newline="") as handle:
        per_query = list(csv.DictReader(handle))
    return SavedRun(directory, json.loads((directory / SUMMARY).read_text()), per_class, per_query)


@dataclass(frozen=True)
class SavedImages:
    """`images.csv` read back: the records (path, label, metadata) and per-image role flags, each `(N,)` bool."""

    records: tuple[ImageRecord, ...]
    query: np.ndarray
    database: np.ndarray
    described: np.ndarray


def load_images(directory: str | Path) -> SavedImages:
    """Read a run's `images.csv` back into `ImageRecord`s (empty label -> unlabelled) and role flags."""
    path = Path(directory) / IMAGES
    if not path.is_file():
        raise DataError(f"'{directory}' has no {IMAGES}: not a hetretrieval run directory")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    roles = ("image_id", "path", "label", "query", "database", "described")
    records = tuple(ImageRecord(Path(row["path"]), row["label"] or None,
                                {k: v for k, v in row.items() if k not in roles and v != ""}) for row in rows)
    flags = {role: np.array([row[role] == "1" for row in rows], dtype=bool) for role in roles[3:]}
    return SavedImages(records, flags["query"], flags["database"], flags["described"])
