"""A run's results on disk, read back by every analysis (no re-extraction); `evaluation/run_files.py` writes them.

Files in the run directory:
- `summary.json`: config, descriptor, dataset, mAP, class_mAP, mP@k / mR@k, counts, timings, skipped images;
- `per_class_map.csv`: class, n_queries, mAP, plus metadata constant within the class;
- `per_query_ap.csv`: one row per query (AP, P@k, R@k, positives, the image's metadata);
- `descriptors.npy` + `images.csv`: one descriptor row per image (zeros where skipped), with path/label/metadata;
- `neighbours.npy`: the top-k database record ids of each query, in `per_query_ap.csv` order;
- `superseded-<time>/`: an earlier run's results, moved aside when the folder was run into again (skipped
  by analyses of a multirun folder).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hetretrieval.data.datasets import ImageRecord
from hetretrieval.errors import DataError

SUMMARY = "summary.json"
PER_CLASS = "per_class_map.csv"
PER_QUERY = "per_query_ap.csv"
IMAGES = "images.csv"
DESCRIPTORS = "descriptors.npy"
NEIGHBOURS = "neighbours.npy"
SUPERSEDED = "superseded-"


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
    try:
        summary = json.loads((directory / SUMMARY).read_text(encoding="utf-8"))
        with (directory / PER_CLASS).open(newline="", encoding="utf-8") as handle:
            per_class = list(csv.DictReader(handle))
        with (directory / PER_QUERY).open(newline="", encoding="utf-8") as handle:
            per_query = list(csv.DictReader(handle))
    except (OSError, ValueError) as error:  # a run cut short by a full disk or a kill: name it, never crash
        raise DataError(f"run directory '{directory}' is broken ({type(error).__name__}: {error})") from None
    if not isinstance(summary, dict):
        raise DataError(f"run directory '{directory}' is broken ({SUMMARY} is not a JSON object)")
    return SavedRun(directory, summary, per_class, per_query)


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
