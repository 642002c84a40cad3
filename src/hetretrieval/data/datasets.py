"""Retrieval datasets: one item type (path, label, metadata) and builders for the layouts researchers have.

A `RetrievalDataset` is a list of `ImageRecord`s plus which of them are queries and which form the database.
Every builder validates at construction (missing root, empty dataset, manifest naming missing files) so a bad
configuration fails at start-up with one clear line, before any model is loaded.
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hetretrieval.errors import ConfigError, DataError

log = logging.getLogger(__name__)

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


def _absolute(path: str | Path) -> Path:
    """`path` made absolute, links kept: records outlive the working directory (runs analysed elsewhere)."""
    return Path(path).expanduser().absolute()


def _require_dir(root: str | Path, what: str) -> Path:
    root = _absolute(root)
    if not root.is_dir():
        raise DataError(f"{what} '{root}' does not exist or is not a directory")
    return root


def _shown(items: Sequence, limit: int = 5) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(map(str, items[:limit])) + more


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def list_images(root: Path) -> list[Path]:
    """Image files under `root`, recursively, sorted, each file once.

    Hidden files and folders (`.ipynb_checkpoints`, `.thumbnails`) are skipped. Folder links are not followed
    (a link back up would list every image again); of several names of one file (file links), the file's own
    is kept (else the first). Links not followed, names dropped and dangling links are logged as warnings.
    """
    found, folder_links, dangling = [], [], []
    for folder, subfolders, files in os.walk(root):  # links to folders are listed, not walked into
        folder = Path(folder)
        subfolders[:] = [name for name in subfolders if not _is_hidden(name)]
        folder_links += [folder / name for name in subfolders if (folder / name).is_symlink()]
        for name in files:
            path = folder / name
            if _is_hidden(name) or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if path.is_file():
                found.append(path)
            elif path.is_symlink() and not path.exists():
                dangling.append(path)
    images, first_name, repeated = [], {}, []
    for path in sorted(found, key=lambda path: (path.is_symlink(), path)):
        target = path.resolve()
        if target in first_name:
            repeated.append(f"{path} (= {first_name[target]})")
        else:
            first_name[target] = path
            images.append(path)
    if folder_links:
        log.warning("not following %d folder link(s) under %s: %s", len(folder_links), root,
                    _shown(folder_links))
    if repeated:
        log.warning("skipping %d other name(s) of images listed under %s: %s", len(repeated), root,
                    _shown(repeated))
    if dangling:
        log.warning("skipping %d dangling link(s) under %s: %s", len(dangling), root, _shown(dangling))
    return sorted(images)


def _folders(root: Path) -> list[str]:
    """Names of the sub-folders of `root` that `list_images` walks into (hidden ones and links left out)."""
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.is_symlink() and not _is_hidden(p.name))


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
    """`root/<class>/<image>`: the class folder (first level) is the label, also of images nested deeper."""
    root = _require_dir(root, "dataset root")
    records = [ImageRecord(path, path.relative_to(root).parts[0], {}) for path in list_images(root)
               if len(path.relative_to(root).parts) > 1]
    return _finish(name, records, distractors, query, database)


def domain_folder(
    root: str | Path, name: str = "pacs", domains: Sequence[str] | None = None,
    distractors: str | Path | None = None, query: Mapping | None = None, database: Mapping | None = None,
) -> RetrievalDataset:
    """`root/<domain>/<class>/<image>` (PACS layout): label = class, the domain kept as metadata."""
    root = _require_dir(root, "dataset root")
    available = _folders(root)
    unknown = set(domains or ()) - set(available)
    if unknown:
        raise ConfigError(f"domains {sorted(unknown)} not found under {root}; available: {available}")
    records = [
        ImageRecord(path, path.relative_to(root / domain).parts[0], {"domain": domain})
        for domain in (domains or available)
        for path in list_images(root / domain)
        if len(path.relative_to(root / domain).parts) > 1
    ]
    return _finish(name, records, distractors, query, database)


_MISSING_LABELS = frozenset({"na", "n/a", "nan", "none", "null"})  # how spreadsheets write a missing value


def _read_utf8(path: Path) -> str:
    """A UTF-8 manifest (a BOM allowed), or one line naming the first byte that is not UTF-8."""
    data = path.read_bytes()
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as error:
        offset = start + error.start
        line = data.count(b"\n", 0, offset) + 1
        raise DataError(f"manifest '{path}' is not UTF-8: byte 0x{data[offset]:02x} at offset {offset} "
                        f"(line {line}); re-save it as UTF-8") from None


def _describe_label(label: str | None) -> str:
    return "no label" if label is None else repr(label)


def csv_manifest(
    manifest: str | Path, root: str | Path | None = None, name: str = "manifest",
    filename_column: str = "filename", label_column: str = "label",
    distractors: str | Path | None = None, query: Mapping | None = None, database: Mapping | None = None,
) -> RetrievalDataset:
    """A CSV listing `filename,label,...`; every other column is kept as per-image metadata.

    Filenames are relative to `root` (default: the manifest's folder). An empty label, or a missing value
    written `NA`, `n/a`, `NaN`, `None` or `null` (any case), marks a distractor. A file listed again with the
    same label and metadata is listed once; with others, it is refused (an image has one class).
    """
    manifest = _absolute(manifest)
    if not manifest.is_file():
        raise DataError(f"manifest '{manifest}' does not exist")
    root = _require_dir(root if root is not None else manifest.parent, "image root")
    reader = csv.DictReader(io.StringIO(_read_utf8(manifest), newline=""))
    columns = reader.fieldnames or []
    for column in (filename_column, label_column):
        if column not in columns:
            raise DataError(f"manifest '{manifest}' has no column '{column}' (columns: {columns})")
    records, missing, ragged, repeated, missing_values = [], [], [], [], Counter()
    first: dict[Path, tuple[int, ImageRecord]] = {}
    for row in reader:
        line = reader.line_num
        if None in row or None in row.values():  # DictReader's marks of extra and of missing fields
            ragged.append(line)
        filename = (row.get(filename_column) or "").strip()
        if not filename:
            raise DataError(f"manifest '{manifest}' line {line}: empty '{filename_column}'")
        path = root / filename
        if not path.is_file():
            missing.append(filename)
            continue
        label = (row.get(label_column) or "").strip()
        if label.lower() in _MISSING_LABELS:
            missing_values[label] += 1
            label = ""
        metadata = {k: (v or "").strip() for k, v in row.items() if k not in (filename_column, label_column) and k}
        record = ImageRecord(path, label or None, metadata)
        target = path.resolve()  # one file however it is spelled
        if target in first:
            first_line, kept = first[target]
            if kept.label != record.label:
                raise DataError(f"manifest '{manifest}' gives '{filename}' two labels: "
                                f"{_describe_label(kept.label)} on line {first_line}, "
                                f"{_describe_label(record.label)} on line {line}; keep one row per image")
            if kept.metadata != record.metadata:
                raise DataError(f"manifest '{manifest}' gives '{filename}' two sets of metadata: "
                                f"{kept.metadata} on line {first_line}, {record.metadata} on line {line}; "
                                "keep one row per image")
            repeated.append(f"{filename} (lines {first_line} and {line})")
            continue
        first[target] = line, record
        records.append(record)
    if missing:
        raise DataError(f"manifest '{manifest}' names {len(missing)} missing file(s) under {root}: "
                        f"{_shown(missing)}")
    if ragged:
        log.warning("manifest '%s': %d row(s) do not have the header's %d fields, extra values ignored and "
                    "missing ones empty: lines %s", manifest, len(ragged), len(columns), _shown(ragged, 10))
    if repeated:
        log.warning("manifest '%s': %d repeated row(s) dropped: %s", manifest, len(repeated),
                    _shown(repeated))
    if missing_values:
        spelled = ", ".join(f"'{spelling}' ({count})" for spelling, count in missing_values.most_common())
        log.warning("manifest '%s': %d label(s) written as a missing value, %s: those images are unlabelled "
                    "distractors", manifest, missing_values.total(), spelled)
    return _finish(name, records, distractors, query, database)
