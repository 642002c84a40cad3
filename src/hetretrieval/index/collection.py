"""A persistent collection index: the image table, the descriptors and a faiss index in one self-describing folder.

```
<index>/config.yaml       how images are described (backbone, pooling, extraction), the index options, the version
<index>/images.csv        image_id, path, bytes, mtime_ns, status (described | skipped | removed), reason
<index>/descriptors.npy   (N, D) float32, row = image_id (zeros where not described)
<index>/index.faiss       the described rows, faiss ids = image ids (Flat, or IVF-PQ for large collections)
```
Image ids are never reused: a file that changed on disk gets a new row (the old one `removed`), so an index
grows by appending. Every file is written under a temporary name and renamed.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hetretrieval.errors import ConfigError, DataError
from hetretrieval.files import atomic_write, write_csv, write_npy

if TYPE_CHECKING:
    import faiss  # imported where used: faiss stays out of import time

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG = "config.yaml"
IMAGE_TABLE = "images.csv"
DESCRIPTORS = "descriptors.npy"
FAISS_INDEX = "index.faiss"
DESCRIBED, SKIPPED, REMOVED = "described", "skipped", "removed"
COLUMNS = ("image_id", "path", "bytes", "mtime_ns", "status", "reason")


@dataclass
class IndexOptions:
    """The faiss index of a collection (the `faiss` config section): `Flat` exact inner product, or `IVF-PQ`
    (`nlist` inverted lists, `m` sub-quantisers of `nbits` bits, `nprobe` lists visited per query); `gpu`
    searches on a GPU when faiss-gpu sees one (`auto`), never (`false`) or must (`true`)."""

    kind: str = "Flat"
    nlist: int = 1024
    m: int = 16
    nbits: int = 8
    nprobe: int = 16
    gpu: str = "auto"

    def __post_init__(self) -> None:
        if self.kind not in ("Flat", "IVF-PQ"):
            raise ConfigError(f"invalid config value at 'faiss.kind': expected Flat or IVF-PQ, got {self.kind!r}")
        if min(self.nlist, self.m, self.nbits, self.nprobe) < 1:
            raise ConfigError("faiss.nlist, faiss.m, faiss.nbits and faiss.nprobe must be >= 1")
        if str(self.gpu).lower() not in ("auto", "true", "false"):
            raise ConfigError(f"invalid config value at 'faiss.gpu': expected auto, true or false, got {self.gpu!r}")


@dataclass
class ImageEntry:
    """One row of the image table; `bytes` and `mtime_ns` identify the file version that was described."""

    image_id: int
    path: str
    bytes: int | None
    mtime_ns: int | None
    status: str
    reason: str = ""


def file_identity(path: str | Path) -> tuple[int, int] | None:
    """`(bytes, mtime_ns)` of a file, or None when it is gone."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


@dataclass(frozen=True)
class Update:
    """What a re-index finds: `new` paths to describe, the `changed` and `vanished` entries' image ids."""

    new: tuple[Path, ...]
    changed: tuple[int, ...]
    vanished: tuple[int, ...]


def plan_update(entries: Sequence[ImageEntry], paths: Sequence[Path]) -> Update:
    """Compare the table with the files found now: unseen paths and changed files are to describe (again),
    live entries whose file is gone are to remove."""
    live = {entry.path: entry for entry in entries if entry.status != REMOVED}
    new, changed = [], []
    for path in paths:
        entry = live.get(str(path))
        if entry is None:
            new.append(path)
        elif file_identity(path) != (entry.bytes, entry.mtime_ns):
            changed.append(entry.image_id)
            new.append(path)
    found = {str(path) for path in paths}
    vanished = [entry.image_id for entry in live.values() if entry.path not in found]
    return Update(tuple(new), tuple(changed), tuple(vanished))


def read_table(directory: str | Path) -> list[ImageEntry]:
    path = Path(directory) / IMAGE_TABLE
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            return [ImageEntry(int(row["image_id"]), row["path"], _int(row["bytes"]), _int(row["mtime_ns"]),
                               row["status"], row["reason"]) for row in csv.DictReader(handle)]
    except (OSError, KeyError, ValueError) as error:
        raise DataError(f"index '{directory}' has no readable {IMAGE_TABLE} ({type(error).__name__}: {error})") from None


def _int(value: str) -> int | None:
    return int(value) if value else None


def write_table(directory: str | Path, entries: Sequence[ImageEntry]) -> Path:
    return write_csv(Path(directory) / IMAGE_TABLE, COLUMNS, (
        [e.image_id, e.path, "" if e.bytes is None else e.bytes, "" if e.mtime_ns is None else e.mtime_ns,
         e.status, e.reason] for e in entries))


def write_descriptors(directory: str | Path, descriptors: np.ndarray) -> Path:
    return write_npy(Path(directory) / DESCRIPTORS, descriptors.astype(np.float32))


def read_descriptors(directory: str | Path) -> np.ndarray:
    try:
        return np.load(Path(directory) / DESCRIPTORS, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"index '{directory}' has no readable {DESCRIPTORS} ({error})") from None


def build_faiss_index(descriptors: np.ndarray, ids: np.ndarray, options: IndexOptions) -> faiss.Index:
    """An inner-product index of L2-normalised `descriptors (n, D)` under faiss ids `ids (n,)` int64.

    IVF-PQ is trained on the descriptors themselves, so it needs at least `max(nlist, 2^nbits)` of them and
    `m` must divide D.
    """
    import faiss

    n, dim = descriptors.shape
    data = np.ascontiguousarray(descriptors, dtype=np.float32)
    if options.kind == "Flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    else:
        if dim % options.m:
            raise ConfigError(f"faiss.m={options.m} must divide the descriptor dimension {dim}")
        needed = max(options.nlist, 2 ** options.nbits)
        if n < needed:
            raise ConfigError(f"IVF-PQ with nlist={options.nlist}, nbits={options.nbits} needs at least {needed} "
                              f"described images to train, the collection has {n}: use faiss.kind=Flat")
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, options.nlist, options.m, options.nbits, faiss.METRIC_INNER_PRODUCT)
        index.train(data)
        index.nprobe = options.nprobe
    index.add_with_ids(data, np.ascontiguousarray(ids, dtype=np.int64))
    return index


def add_to_index(index: faiss.Index, descriptors: np.ndarray, ids: np.ndarray) -> None:
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(descriptors, dtype=np.float32), np.ascontiguousarray(ids, np.int64))


def remove_from_index(index: faiss.Index, ids: Sequence[int]) -> int:
    """Drop image ids from the index; returns how many entries went."""
    return int(index.remove_ids(np.asarray(ids, dtype=np.int64))) if len(ids) else 0


def write_faiss_index(directory: str | Path, index: faiss.Index) -> Path:
    import faiss

    return atomic_write(Path(directory) / FAISS_INDEX, lambda partial: faiss.write_index(index, str(partial)))


def read_faiss_index(directory: str | Path) -> faiss.Index:
    import faiss

    path = Path(directory) / FAISS_INDEX
    if not path.is_file():
        raise DataError(f"index '{directory}' has no {FAISS_INDEX}")
    try:
        return faiss.read_index(str(path))
    except RuntimeError as error:
        raise DataError(f"{path} is unreadable ({str(error).splitlines()[0]})") from None


def search_index(index: faiss.Index, queries: np.ndarray, top_k: int, gpu: str = "auto",
                 nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`(Q, D)` queries -> `scores (Q, k)` descending and image `ids (Q, k)` (-1 past the indexed images), on a
    GPU when faiss-gpu has one and `gpu` allows it (`on_gpus`)."""
    from hetretrieval.index.search import on_gpus  # torch, only when searching

    if nprobe is not None and hasattr(index, "nprobe"):
        index.nprobe = nprobe
    k = min(top_k, index.ntotal)
    searcher, _ = on_gpus(index, k, gpu)
    scores, ids = searcher.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return scores, ids
