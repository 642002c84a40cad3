"""Retrieval datasets: one item type (path, label, metadata) and builders for the layouts researchers have.

A `RetrievalDataset` is a list of `ImageRecord`s plus which of them are queries and which form the database.
Every builder validates at construction (missing root, empty dataset, manifest naming missing files) so a bad
configuration fails at start-up with one clear line, before any model is loaded.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hetretrieval.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".ppm", ".pgm")


@dataclass(frozen=True)
class ImageRecord:
    """One image of a collection; `label` is None for an unlabelled distractor."""

    path: Path
    label: str | None
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RetrievalDataset:
    """Images and the evaluation protocol over them.

    `query_ids` and `database_ids` index `records`. A query is never matched against itself, so when an image
    is both a query and in the database (the paper's protocol) it is left out of its own ranking.
    """

    name: str
    records: tuple[ImageRecord, ...]
    query_ids: np.ndarray
    database_ids: np.ndarray

    @property
    def labels(self) -> list[str | None]:
        return [record.label for record in self.records]

    def __len__(self) -> int:
        return len(self.records)


def _matches(record: ImageRecord, selector: Mapping[str, Sequence[str]] | None) -> bool:
    """Whether a record passes a split selector `{key: [allowed values]}` (keys: `label` or metadata columns)."""
    if not selector:
        return True
    for key, allowed in selector.items():
        value = record.label if key == "label" else record.metadata.get(key)
        if str(value) not in {str(item) for item in ([allowed] if isinstance(allowed, str) else allowed)}:
            return False
    return True


def _check_selector_keys(records: Sequence[ImageRecord], selector: Mapping | None, role: str) -> None:
    known = {"label"} | {key for record in records for key in record.metadata}
    unknown = set(selector or {}) - known
    if unknown:
        raise ConfigError(f"{role} selector uses unknown field(s) {sorted(unknown)}; known: {sorted(known)}")


def make_dataset(
    name: str,
    records: Iterable[ImageRecord],
    query: Mapping[str, Sequence[str]] | None = None,
    database: Mapping[str, Sequence[str]] | None = None,
) -> RetrievalDataset:
    """Assemble a dataset: queries are the labelled images passing `query`; the database, all passing `database`.

    Selectors are `{field: [values]}` over `label` and metadata, e.g. `query={"domain": ["sketch"]}`,
    `database={"domain": ["photo"]}` for sketch-to-photo retrieval. Unlabelled distractors are never queries.
    """
    records = tuple(records)
    if not records:
        raise DataError(f"dataset '{name}' has no images")
    _check_selector_keys(records, query, "query")
    _check_selector_keys(records, database, "database")
    query_ids = np.array([i for i, r in enumerate(records) if r.label is not None and _matches(r, query)], np.int64)
    database_ids = np.array([i for i, r in enumerate(records) if _matches(r, database)], dtype=np.int64)
    if query_ids.size == 0:
        raise DataError(f"dataset '{name}' has no labelled query images (query selector: {dict(query or {})})")
    if database_ids.size == 0:
        raise DataError(f"dataset '{name}' has an empty database (database selector: {dict(database or {})})")
    return RetrievalDataset(name, records, query_ids, database_ids)


def _require_dir(root: str | Path, what: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{what} '{root}' does not exist or is not a directory")
    return root


def list_images(root: Path) -> list[Path]:
    """Image files under `root`, recursively, sorted (hidden files skipped)."""
    return sorted(
        path for path in root.rglob("*")
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
    )


def _distractor_records(distractors: str | Path | None, listed: set[Path]) -> list[ImageRecord]:
    """Unlabelled images of a folder, those already listed excepted: added to the database only."""
    if distractors is None:
        return []
    folder = _require_dir(distractors, "distractor folder")
    return [ImageRecord(path, None, {"distractor": "true"}) for path in list_images(folder)
            if path.resolve() not in listed]


def _finish(name, records, distractors, query, database) -> RetrievalDataset:
    listed = {record.path.resolve() for record in records}
    return make_dataset(name, [*records, *_distractor_records(distractors, listed)], query, database)


def labelled_folder(
    root: str | Path, name: str = "folder", distractors: str | Path | None = None,
    query: Mapping | None = None, database: Mapping | None = None,
) -> RetrievalDataset:
    """`root/<class>/<image>`: the sub-folder name is the label."""
    root = _require_dir(root, "dataset root")
    records = [ImageRecord(path, path.parent.name, {}) for class_dir in sorted(p for p in root.iterdir() if p.is_dir())
               for path in list_images(class_dir)]
    return _finish(name, records, distractors, query, database)


def domain_folder(
    root: str | Path, name: str = "pacs", domains: Sequence[str] | None = None,
    distractors: str | Path | None = None, query: Mapping | None = None, database: Mapping | None = None,
) -> RetrievalDataset:
    """`root/<domain>/<class>/<image>` (PACS layout): label = class, the domain kept as metadata."""
    root = _require_dir(root, "dataset root")
    available = sorted(p.name for p in root.iterdir() if p.is_dir())
    unknown = set(domains or ()) - set(available)
    if unknown:
        raise ConfigError(f"domains {sorted(unknown)} not found under {root}; available: {available}")
    records = [
        ImageRecord(path, class_dir.name, {"domain": domain})
        for domain in (domains or available)
        for class_dir in sorted(p for p in (root / domain).iterdir() if p.is_dir())
        for path in list_images(class_dir)
    ]
    return _finish(name, records, distractors, query, database)


def csv_manifest(
    manifest: str | Path, root: str | Path | None = None, name: str = "manifest",
    filename_column: str = "filename", label_column: str = "label",
    distractors: str | Path | None = None, query: Mapping | None = None, database: Mapping | None = None,
) -> RetrievalDataset:
    """A CSV listing `filename,label,...`; every other column is kept as per-image metadata.

    Filenames are relative to `root` (default: the manifest's folder). An empty label marks a distractor.
    """
    manifest = Path(manifest).expanduser()
    if not manifest.is_file():
        raise DataError(f"manifest '{manifest}' does not exist")
    root = _require_dir(root if root is not None else manifest.parent, "image root")
    with manifest.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        for column in (filename_column, label_column):
            if column not in columns:
                raise DataError(f"manifest '{manifest}' has no column '{column}' (columns: {columns})")
        rows = list(reader)
    records, missing = [], []
    for line, row in enumerate(rows, start=2):
        filename = (row.get(filename_column) or "").strip()
        if not filename:
            raise DataError(f"manifest '{manifest}' line {line}: empty '{filename_column}'")
        path = root / filename
        if not path.is_file():
            missing.append(filename)
            continue
        metadata = {k: (v or "").strip() for k, v in row.items() if k not in (filename_column, label_column) and k}
        records.append(ImageRecord(path, (row.get(label_column) or "").strip() or None, metadata))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(f"manifest '{manifest}' names {len(missing)} missing file(s) under {root}: {shown}")
    return _finish(name, records, distractors, query, database)
