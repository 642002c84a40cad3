"""The descriptor store: descriptors cached under `paths.cache_dir`, keyed by everything that determines them.

A head's entry is keyed by a SHA-256 fingerprint of the backbone (name and weights digest), the head (config
and state digest: GeM's p, NetVLAD's centroids, whitening), the backbone's `layer`, how images are read
(`max_size`, `max_pixels`, crop size, `scales`, `scale_aggregation`) and every image (path, byte size, mtime,
crop box). Any change is a miss. Entries are written to a temporary name and renamed, so a reader never sees
half an entry; an entry that fails to load (truncated, corrupt: the zip's CRC-32 is checked on read) or
disagrees with its key is reported, deleted and rebuilt.
Entries hold arrays only (`allow_pickle=False`): nothing in them can name a callable. A global head's
descriptors sit beside its entry as `<head>-<key>.descriptors.npy` in the store's dtype (float32, or float16 to
halve disk and memory: part of the key), read back memory-mapped so no step loads the whole set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hetretrieval.data.datasets import ImageRecord
from hetretrieval.data.images import CROP_KEY
from hetretrieval.errors import ConfigError, DataError
from hetretrieval.extraction.batching import ImagePlan, ImageSource, keep_first, merge_gathered
from hetretrieval.extraction.engine import Extraction, finalize
from hetretrieval.files import atomic_write, write_npy
from hetretrieval.models.local.features import LocalFeatures

log = logging.getLogger(__name__)

FORMAT_VERSION = 2


def module_digest(module: nn.Module | None) -> str | None:
    """SHA-256 of a module's state (names, dtypes, shapes and bytes of every parameter and buffer)."""
    if module is None:
        return None
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def describe_component(component) -> dict:
    """What identifies a head or extractor: its class, its plain settings and its state digest."""
    settings = asdict(component) if is_dataclass(component) else {
        key: value for key, value in vars(component).items()
        if not key.startswith("_") and key != "training" and isinstance(value, int | float | str | bool | tuple | list | type(None))}
    return {"class": f"{type(component).__module__}.{type(component).__qualname__}", "settings": settings,
            "state": module_digest(component) if isinstance(component, nn.Module) else None}


def images_fingerprint(records: Sequence[ImageRecord]) -> list:
    """`[path, bytes, mtime_ns, crop box]` per image (a missing file fingerprints as such)."""
    rows = []
    for record in records:
        try:
            stat = os.stat(record.path)
            rows.append([str(record.path), stat.st_size, stat.st_mtime_ns, record.metadata.get(CROP_KEY)])
        except OSError:
            rows.append([str(record.path), None, None, record.metadata.get(CROP_KEY)])
    return rows


def fingerprint(*parts) -> str:
    """SHA-256 of the canonical JSON of `parts`."""
    text = json.dumps([FORMAT_VERSION, *parts], sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def extraction_fingerprint(records: Sequence[ImageRecord], source: ImageSource, backbone: nn.Module | None,
                           scales: Sequence[float], scale_aggregation: str = "mean", precision: str = "32",
                           channels_last: bool = False) -> str:
    """The part of every head's key shared by one run: images, how they are read (aspect buckets and their
    stride), the backbone (and the layer that feeds the heads), how scales are combined, the numerics
    (`precision`, `channels_last`). Defaults that leave descriptors as they were add nothing, so earlier
    entries stay valid."""
    read = asdict(source)
    if source.bucketing == "exact":
        del read["bucketing"], read["stride"]
    numerics = {key: value for key, value in (("precision", str(precision)), ("channels_last", channels_last))
                if value not in ("32", False)}
    return fingerprint({"images": images_fingerprint(records), "source": read,
                        "scales": [float(s) for s in scales], "scale_aggregation": scale_aggregation,
                        "backbone": getattr(backbone, "model_name", None), "layer": getattr(backbone, "layer", None),
                        "weights": module_digest(backbone), **numerics})


class DescriptorStore:
    """Entries `<root>/<head>-<key>.npz` (+ `.descriptors.npy` for global heads), one per (extraction
    fingerprint, head). `root=None` disables it; `dtype` (float32 | float16) is how descriptors are kept."""

    def __init__(self, root: str | Path | None, dtype: str = "float32") -> None:
        if dtype not in ("float32", "float16"):
            raise ConfigError(f"invalid config value at 'store.dtype': expected float32 or float16, got {dtype!r}")
        self.root = None if root is None else Path(root)
        self.dtype = dtype

    def key(self, shared: str, head: str, component, whitening: nn.Module | None = None) -> str:
        return fingerprint(shared, head, describe_component(component), module_digest(whitening), self.dtype)

    def path(self, head: str, key: str) -> Path:
        return self.root / f"{head}-{key[:24]}.npz"

    def descriptors_path(self, head: str, key: str) -> Path:
        return self.root / f"{head}-{key[:24]}.descriptors.npy"

    def load(self, head: str, key: str, n_images: int) -> Extraction | None:
        """The stored extraction of one head, or None (absent, disabled, or broken: then reported and removed)."""
        if self.root is None or not self.path(head, key).is_file():
            return None
        path = self.path(head, key)
        try:
            with np.load(path, allow_pickle=False) as entry:
                arrays = {name: entry[name] for name in entry.files}
            if str(arrays["key"]) != key or arrays["valid"].shape != (n_images,):
                raise ValueError("the entry does not belong to this key")
            if bool(arrays["global"]):
                descriptors = np.load(self.descriptors_path(head, key), mmap_mode="r", allow_pickle=False)
                if descriptors.shape[0] != n_images or descriptors.dtype != np.dtype(self.dtype):
                    raise ValueError(f"descriptors {descriptors.dtype}{descriptors.shape} do not match the entry")
                arrays["descriptors"] = descriptors
            return _unpack(head, arrays)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            log.warning("descriptor cache entry %s is unreadable (%s: %s): rebuilding it", path,
                        type(error).__name__, error)
            path.unlink(missing_ok=True)
            self.descriptors_path(head, key).unlink(missing_ok=True)
            return None

    def save(self, head: str, key: str, extraction: Extraction) -> Path | None:
        """Store one head of a complete extraction atomically (an incomplete one is never stored)."""
        if self.root is None or not extraction.complete:
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(head, key)
        try:
            if head in extraction.descriptors:  # written (and renamed) before the entry that vouches for it
                # asarray: a memory-mapped merge of DDP shards already in the store dtype streams to disk uncopied
                write_npy(self.descriptors_path(head, key), np.asarray(extraction.descriptors[head], self.dtype))
            _write_npz(path, _pack(head, key, extraction))
        except DataError as error:
            log.warning("could not store descriptors (%s): continuing without the cache", error)
            return None
        return path


def _write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    def write(partial: Path) -> None:
        with partial.open("wb") as handle:  # a handle: np.savez would append `.npz` to the temporary name
            np.savez(handle, **arrays)

    return atomic_write(path, write)


def _pack(head: str, key: str, extraction: Extraction) -> dict[str, np.ndarray]:
    skipped_ids = np.array(list(extraction.skipped), dtype=np.int64)
    arrays = {"key": np.array(key), "valid": extraction.valid, "skipped_ids": skipped_ids,
              "skipped_reasons": np.array([extraction.skipped[i] for i in skipped_ids.tolist()], dtype=str),
              "seconds": np.array(extraction.seconds), "global": np.array(head in extraction.descriptors)}
    if head in extraction.descriptors:  # the descriptors themselves: `DescriptorStore.descriptors_path`
        return arrays
    described = [f for f in extraction.local_features[head] if f is not None]
    counts = np.array([len(f) for f in described], dtype=np.int64)
    dim = described[0].descriptors.shape[1] if described else 0
    dtype = described[0].descriptors.dtype if described else np.float32
    arrays.update({
        "keypoints": np.concatenate([f.keypoints for f in described]) if described else np.zeros((0, 2), np.float32),
        "local_descriptors": np.concatenate([f.descriptors for f in described]) if described
        else np.zeros((0, dim), dtype),
        "scores": np.concatenate([f.scores for f in described]) if described else np.zeros(0, np.float32),
        "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        "image_sizes": np.array([f.image_size for f in described], dtype=np.int64).reshape(-1, 2),
        "owners": np.array([i for i, f in enumerate(extraction.local_features[head]) if f is not None], np.int64),
    })
    return arrays


def _unpack(head: str, arrays: Mapping[str, np.ndarray]) -> Extraction:
    valid = arrays["valid"].astype(bool)
    skipped = dict(zip(arrays["skipped_ids"].tolist(), arrays["skipped_reasons"].tolist(), strict=True))
    extraction = Extraction(valid, skipped, seconds=float(arrays["seconds"]))
    if "descriptors" in arrays:
        extraction.descriptors[head] = arrays["descriptors"]
        return extraction
    features: list[LocalFeatures | None] = [None] * valid.size
    offsets = arrays["offsets"]
    for row, owner in enumerate(arrays["owners"].tolist()):
        start, end = offsets[row], offsets[row + 1]
        features[owner] = LocalFeatures(arrays["keypoints"][start:end], arrays["local_descriptors"][start:end],
                                        arrays["scores"][start:end], tuple(int(v) for v in arrays["image_sizes"][row]))
    extraction.local_features[head] = features
    return extraction


class CachedHeads:
    """The store's view of one run: each head's key, the heads found (`hits`) and the rest to extract.

    `complete(fresh)` stores the freshly extracted heads and returns them merged with the hits.
    """

    def __init__(self, store: DescriptorStore, keys: Mapping[str, str], n_images: int) -> None:
        self.store, self.keys = store, dict(keys)
        started = time.perf_counter()
        self.found = {head: self.store.load(head, key, n_images) for head, key in self.keys.items()}
        self.load_seconds = time.perf_counter() - started
        self.hits = {head for head, entry in self.found.items() if entry is not None}

    @property
    def missing(self) -> list[str]:
        return [head for head in self.keys if head not in self.hits]

    def status(self, head: str) -> str:
        """`hit` when the head's descriptors came from the store, else `miss`."""
        return "hit" if head in self.hits else "miss"

    def shards(self, fallback: str | Path) -> ShardSet:
        """Where a distributed extraction of the missing heads puts its rank shards: beside the entries, keyed by
        the missing heads' keys, or under `fallback` (the run folder) when the store is off."""
        return ShardSet(self.store.root if self.store.root is not None else fallback,
                        fingerprint(*(self.keys[head] for head in self.missing)), self.store.dtype)

    def complete(self, fresh: Extraction | None) -> Extraction:
        if fresh is not None:
            for head in self.missing:
                self.store.save(head, self.keys[head], fresh)
        parts = [entry for entry in self.found.values() if entry is not None] + ([fresh] if fresh else [])
        merged = Extraction(parts[0].valid.copy(), {}, seconds=self.load_seconds + (fresh.seconds if fresh else 0.0),
                            complete=all(p.complete for p in parts))
        for part in parts:
            merged.valid |= part.valid
            merged.skipped.update(part.skipped)
            merged.descriptors.update(part.descriptors)
            merged.local_features.update(part.local_features)
        merged.skipped = dict(sorted(merged.skipped.items()))
        return merged


class ShardSet:
    """The rank shards of one distributed extraction, in `<root>/<key[:24]>.shards/`.

    Rank `r` of `W` writes `W-r.indices.npy` (its record indices), `W-r.head-<head>.npy` (a global head's
    descriptors, in the store dtype) or `W-r.head-<head>.npz` (a local head's features, as in an entry), and last
    the completion marker `W-r.done.json` (key, world size, heads, skipped images). After a barrier rank 0
    `merge`s them in dataset order into one preallocated memory-mapped array per head, copying from memory-mapped
    shards, so no process ever holds every descriptor. A shard without its marker (a killed rank) or whose marker
    names another key or world size is never merged: that rank's images are described again.
    """

    def __init__(self, root: str | Path, key: str, dtype: str = "float32") -> None:
        self.folder, self.key, self.dtype = Path(root) / f"{key[:24]}.shards", key, dtype

    def file(self, world_size: int, rank: int | str, name: str) -> Path:
        return self.folder / f"{world_size}-{rank}.{name}"

    def write(self, rank: int, world_size: int, part: tuple) -> bool:
        """Write a rank's `Collector.part()`, the marker last; a failed write is logged (rank 0 then describes
        that rank's images again) and returns False, so the rank still reaches the barrier."""
        indices, descriptors, local, skipped, seconds = part
        marker = self.file(world_size, rank, "done.json")
        facts = {"key": self.key, "world_size": world_size, "rank": rank, "rows": int(indices.size),
                 "global": sorted(descriptors), "local": sorted(local), "seconds": seconds,
                 "skipped": {str(index): reason for index, reason in skipped.items()}}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            marker.unlink(missing_ok=True)  # an earlier run's marker never vouches for this run's arrays
            write_npy(self.file(world_size, rank, "indices.npy"), indices.astype(np.int64))
            for head, values in descriptors.items():
                write_npy(self.file(world_size, rank, f"head-{head}.npy"), values.astype(self.dtype))
            for head, features in local.items():
                rows = Extraction(np.ones(indices.size, bool), {},
                                  local_features={head: [features[i] for i in indices.tolist()]})
                _write_npz(self.file(world_size, rank, f"head-{head}.npz"), _pack(head, self.key, rows))
            atomic_write(marker, lambda partial: partial.write_text(json.dumps(facts), encoding="utf-8"))
        except (OSError, DataError) as error:
            log.warning("could not write the extraction shard of rank %d (%s): rank 0 describes its images again",
                        rank, error)
            return False
        return True

    def merge(self, world_size: int, plan: ImagePlan, describe_again: Callable[[int], Extraction]) -> Extraction:
        """Every rank's shard in dataset order; a rank whose shard is not complete is replaced by
        `describe_again(rank)` (its images, described in this process). Global heads come back memory-mapped,
        in the store dtype."""
        started = time.perf_counter()
        n_images = len(plan.shapes)
        shards, again = [], []
        for rank in range(world_size):
            checked = self._checked(world_size, rank)
            if checked is None:
                again.append(describe_again(rank))
            else:
                shards.append((rank, *checked))
        extraction = Extraction(np.zeros(n_images, bool), dict(plan.unreadable))
        for _, facts, indices in shards:
            extraction.valid[indices] = True
            extraction.skipped.update({int(index): reason for index, reason in facts["skipped"].items()})
        for part in again:
            extraction.valid |= part.valid
            extraction.skipped.update(part.skipped)
        for head in sorted({h for _, f, _ in shards for h in f["global"]} | {h for p in again for h in p.descriptors}):
            sources = [(indices, np.load(self.file(world_size, rank, f"head-{head}.npy"), mmap_mode="r"))
                       for rank, facts, indices in shards if head in facts["global"]]
            sources += [(np.flatnonzero(p.valid), p.descriptors[head][p.valid]) for p in again if head in p.descriptors]
            extraction.descriptors[head] = self._merged(world_size, head, sources, n_images)
        for head in sorted({h for _, f, _ in shards for h in f["local"]} | {h for p in again for h in p.local_features}):
            merged: list[LocalFeatures | None] = [None] * n_images
            for rank, facts, indices in shards:
                if head in facts["local"]:
                    with np.load(self.file(world_size, rank, f"head-{head}.npz"), allow_pickle=False) as entry:
                        features = _unpack(head, {name: entry[name] for name in entry.files}).local_features[head]
                    keep_first(merged, zip(indices.tolist(), features, strict=True))
            for part in again:
                keep_first(merged, enumerate(part.local_features.get(head, [])))
            extraction.local_features[head] = merged
        extraction.seconds = max([f["seconds"] for _, f, _ in shards], default=0.0) + time.perf_counter() - started
        return finalize(extraction, plan)

    def remove(self) -> None:
        """Delete the shard folder (once the merged extraction is stored)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def _checked(self, world_size: int, rank: int) -> tuple[dict, np.ndarray] | None:
        """A rank's marker and indices when its shard is whole and of this extraction, else None (logged)."""
        try:
            facts = json.loads(self.file(world_size, rank, "done.json").read_text(encoding="utf-8"))
            if (facts.get("key"), facts.get("world_size"), facts.get("rank")) != (self.key, world_size, rank):
                raise ValueError(f"its marker names another extraction (key {str(facts.get('key'))[:12]}..., "
                                 f"world size {facts.get('world_size')}, rank {facts.get('rank')})")
            indices = np.load(self.file(world_size, rank, "indices.npy"), allow_pickle=False)
            if indices.shape != (facts["rows"],):
                raise ValueError(f"{indices.shape[0]} indices where its marker says {facts['rows']} rows")
            for head in facts["global"]:
                values = np.load(self.file(world_size, rank, f"head-{head}.npy"), mmap_mode="r", allow_pickle=False)
                if values.shape[0] != facts["rows"] or values.dtype != np.dtype(self.dtype):
                    raise ValueError(f"{head} descriptors {values.dtype}{values.shape} do not match its marker")
            for head in facts["local"]:
                if not self.file(world_size, rank, f"head-{head}.npz").is_file():
                    raise ValueError(f"no {head} features")
        except FileNotFoundError as error:
            reason = f"incomplete (no {Path(error.filename).name}: a killed rank?)"
        except (OSError, ValueError, KeyError, TypeError) as error:
            reason = f"unusable ({error})"
        else:
            return facts, indices
        log.warning("extraction shard %d-%d in %s is %s: describing its images again, never merging it",
                    world_size, rank, self.folder, reason)
        return None

    def _merged(self, world_size: int, head: str, sources: Sequence[tuple[np.ndarray, np.ndarray]],
                n_images: int) -> np.ndarray:
        """`(indices, rows)` of every rank -> one `(N, D)` memory-mapped array in dataset order (`merge_gathered`
        into a memory map)."""
        path = self.file(world_size, "merged", f"head-{head}.npy")
        merged, _ = merge_gathered(sources, n_images, head, lambda shape: np.lib.format.open_memmap(
            path, mode="w+", dtype=self.dtype, shape=shape))
        merged.flush()
        del merged
        return np.load(path, mmap_mode="r", allow_pickle=False)
