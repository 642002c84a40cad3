"""Index an unlabelled collection and search it (`hetretrieval-index`, `hetretrieval-search`).

Indexing describes every image of a folder (any layout) through the extraction engine and the descriptor store,
and keeps the image table, the descriptors and a faiss index in the index folder (`index.collection`); a re-run
describes only the files that are new or changed since, and drops the ones that vanished. The folder's
`config.yaml` holds the backbone, pooling and extraction nodes, so a search describes its queries exactly as
the collection was described (a weights or settings mismatch is refused).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from hetretrieval.config import ExtractionOptions, instantiate, typed
from hetretrieval.data.datasets import ImageRecord, list_images
from hetretrieval.errors import ConfigError, DataError
from hetretrieval.extraction.batching import ImageSource
from hetretrieval.files import write_csv
from hetretrieval.index import collection as stored
from hetretrieval.index.collection import DESCRIBED, REMOVED, SKIPPED, ImageEntry, IndexOptions

log = logging.getLogger(__name__)

HEAD = "descriptor"  # the one head of an index
DESCRIBER_NODES = ("backbone", "pooling", "extraction")


@dataclass
class Describer:
    """The network, engine and image source of an index, and `key`: the store fingerprint of everything that
    determines a descriptor except the images (backbone weights, head state, extraction settings)."""

    engine: object
    backbone: object
    head: object
    source: ImageSource
    options: ExtractionOptions
    key: str

    def describe(self, records: Sequence[ImageRecord], store_root: Path | None) -> tuple[object, str]:
        """`(Extraction of records, "hit" | "miss")`: through the descriptor store when `store_root` is set."""
        from hetretrieval.extraction.store import CachedHeads, DescriptorStore, extraction_fingerprint

        store = DescriptorStore(store_root)
        shared = extraction_fingerprint(records, self.source, self.backbone, self.options.scales,
                                        self.options.scale_aggregation)
        cache = CachedHeads(store, {HEAD: store.key(shared, HEAD, self.head)}, len(records))
        fresh = self.engine.extract(records, self.source) if cache.missing else None
        return cache.complete(fresh), cache.status(HEAD)


def build_describer(nodes: DictConfig, device: str | None = None) -> Describer:
    """Backbone + one global head from `backbone` / `pooling` / `extraction` nodes, on `device` (default: the
    accelerator when present)."""
    from hetretrieval.extraction.engine import ExtractionEngine, default_device
    from hetretrieval.extraction.store import DescriptorStore, extraction_fingerprint
    from hetretrieval.models.factory import build_heads
    from hetretrieval.models.network import RetrievalNetwork

    options = typed(nodes.extraction, ExtractionOptions, "extraction")
    backbone = instantiate(nodes.backbone)
    heads, local = build_heads({HEAD: nodes.pooling}, backbone)
    if local:
        raise ConfigError("a collection index holds one global descriptor per image: choose a global pooling "
                          "(gem, mac, spoc, rmac, cls) and re-rank with rerank=delf|orb at search time")
    if hasattr(heads[HEAD], "prepare"):
        raise ConfigError(f"pooling {type(heads[HEAD]).__name__} learns from the images it describes, so a grown "
                          "collection and its queries would be described differently: choose gem, mac, spoc, "
                          "rmac or cls")
    network = RetrievalNetwork(backbone, heads, options.scales, None, options.scale_aggregation)
    engine = ExtractionEngine.from_options(network, None, options).to(device or default_device())
    source = ImageSource(options.max_size, options.max_pixels)
    key = DescriptorStore(None).key(extraction_fingerprint([], source, backbone, options.scales,
                                                           options.scale_aggregation, options.precision,
                                                           options.channels_last), HEAD, heads[HEAD])
    return Describer(engine, backbone, heads[HEAD], source, options, key)


def describer_nodes(cfg: DictConfig) -> DictConfig:
    return OmegaConf.create({name: OmegaConf.to_container(cfg[name], resolve=True) for name in DESCRIBER_NODES})


def _collection_images(folder: str | Path) -> list[Path]:
    root = Path(folder).expanduser().absolute()
    if not root.is_dir():
        raise DataError(f"collection '{root}' does not exist or is not a directory")
    return list_images(root)


def index_collection(cfg: DictConfig) -> dict:
    """Create or update the index `cfg.index` from the images under `cfg.collection`; returns what it did:
    `{images, described, skipped, new, changed, removed, indexed, kind}`."""
    if not cfg.get("collection") or not cfg.get("index"):
        raise ConfigError("hetretrieval-index needs collection=<folder of images> index=<index folder>")
    options = typed(cfg.faiss, IndexOptions, "faiss")
    directory = Path(cfg.index).expanduser().absolute()
    nodes = describer_nodes(cfg)
    existing = (directory / stored.CONFIG).is_file()
    if existing:
        saved = _load_config(directory)
        for name in DESCRIBER_NODES:  # options added to the project since keep their defaults: not compared
            before, now = OmegaConf.to_container(saved[name]), OmegaConf.to_container(nodes[name])
            for key in sorted(set(before) & set(now)):
                if before[key] != now[key]:
                    raise ConfigError(f"index '{directory}' was built with {name}.{key}={before[key]!r}, not "
                                      f"{now[key]!r}: re-run with its options (see its {stored.CONFIG}) or index "
                                      "into a new folder")
        options = typed(saved.faiss, IndexOptions, "faiss")
    paths = _collection_images(cfg.collection)
    entries = stored.read_table(directory) if existing else []
    update = stored.plan_update(entries, paths)
    describer = build_describer(nodes)
    if existing and str(saved.describer_key) != describer.key:
        raise ConfigError(f"index '{directory}' was described with other weights or head state than "
                          f"{nodes.backbone.model_name} has here: index into a new folder")
    directory.mkdir(parents=True, exist_ok=True)
    descriptors = stored.read_descriptors(directory) if existing else None
    index = stored.read_faiss_index(directory) if existing else None
    gone = {*update.changed, *update.vanished}
    for entry in entries:
        if entry.image_id in gone:
            was_described = entry.status == DESCRIBED
            entry.status = REMOVED
            entry.reason = ("file changed on disk: described again" if entry.image_id in update.changed
                            else "file no longer in the collection")
            if was_described and index is not None:
                stored.remove_from_index(index, [entry.image_id])
    first_id = len(entries)
    fresh, cache_status = None, None
    if update.new:
        records = [ImageRecord(path, None) for path in update.new]
        store_root = Path(cfg.paths.cache_dir) / "descriptors" if cfg.get("cache", True) else None
        fresh, cache_status = describer.describe(records, store_root)
        for offset, path in enumerate(update.new):
            identity = stored.file_identity(path) or (None, None)
            reason = fresh.skipped.get(offset, "")
            entries.append(ImageEntry(first_id + offset, str(path), *identity,
                                      DESCRIBED if fresh.valid[offset] else SKIPPED, reason))
        rows = fresh.descriptors[HEAD]
        new_ids = np.arange(first_id, first_id + len(update.new))[fresh.valid]
        descriptors = rows if descriptors is None else np.concatenate([descriptors, rows])
        if index is None:
            if not fresh.valid.any():
                raise DataError(f"none of the {len(update.new)} images under '{cfg.collection}' could be read")
            index = stored.build_faiss_index(rows[fresh.valid], new_ids, options)
        else:
            stored.add_to_index(index, rows[fresh.valid], new_ids)
    if index is None:
        raise DataError(f"no images found under '{cfg.collection}'")
    if update.new or gone or not existing:
        stored.write_descriptors(directory, descriptors)
        stored.write_faiss_index(directory, index)
        stored.write_table(directory, entries)
    if not existing:
        _write_config(directory, nodes, options, describer.key)
    skipped = [e for e in entries[first_id:] if e.status == SKIPPED]
    return {"images": len(paths), "new": len(update.new) - len(update.changed), "changed": len(update.changed),
            "removed": len(update.vanished), "described": int(fresh.valid.sum()) if fresh is not None else 0,
            "skipped": len(skipped), "indexed": int(index.ntotal), "kind": options.kind,
            "descriptor_cache": cache_status}


def _write_config(directory: Path, nodes: DictConfig, options: IndexOptions, key: str) -> None:
    config = OmegaConf.merge(nodes, {"version": stored.FORMAT_VERSION, "faiss": asdict(options),
                                     "describer_key": key})
    path = directory / stored.CONFIG
    partial = path.with_name(f".{path.name}.partial")
    OmegaConf.save(config, partial)
    partial.replace(path)


def _load_config(directory: Path) -> DictConfig:
    path = directory / stored.CONFIG
    if not path.is_file():
        raise DataError(f"'{directory}' is not a hetretrieval index (no {stored.CONFIG}); build one with "
                        "hetretrieval-index collection=<folder> index=<folder>")
    config = OmegaConf.load(path)
    if config.get("version") != stored.FORMAT_VERSION:
        raise DataError(f"index '{directory}' has format version {config.get('version')}, this hetretrieval "
                        f"reads version {stored.FORMAT_VERSION}: rebuild it")
    return config


@dataclass(frozen=True)
class Neighbour:
    """One result of a query: its rank, the image, the descriptors' cosine `similarity` and, re-ranked by
    spatial verification, the `inliers` that ranked it."""

    rank: int
    image_id: int
    path: str
    similarity: float
    inliers: int | None = None

    @property
    def caption(self) -> str:
        return f"#{self.rank} {self.similarity:.3f}" + (f" ({self.inliers} inl.)" if self.inliers is not None else "")


def search_collection(cfg: DictConfig, output_dir: str | Path) -> dict[str, list[Neighbour]]:
    """Describe `cfg.query` (an image or a folder) as the index was described, search it, optionally re-rank
    by spatial verification (`cfg.rerank`), and write `results.csv`, `contact_sheet.png` and `results.html`
    under `output_dir`; returns each query path's neighbours (the query file itself left out)."""
    from hetretrieval.analysis.html_report import write_search_page
    from hetretrieval.analysis.retrieval_figures import GridRow, draw_grid

    if not cfg.get("index") or not cfg.get("query"):
        raise ConfigError("hetretrieval-search needs index=<index folder> query=<image or folder>")
    top_k = int(cfg.top_k)
    if top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    directory = Path(cfg.index).expanduser().absolute()
    config = _load_config(directory)
    query = Path(cfg.query).expanduser().absolute()
    if query.is_dir():
        queries = list_images(query)
    elif query.is_file():
        queries = [query]
    else:
        raise DataError(f"query '{query}' is neither an image nor a folder")
    if not queries:
        raise DataError(f"no images under query folder '{query}'")
    entries = {entry.image_id: entry for entry in stored.read_table(directory)}
    index = stored.read_faiss_index(directory)
    faiss_options = typed(config.faiss, IndexOptions, "faiss")
    describer = build_describer(config)
    if describer.key != str(config.describer_key):
        raise ConfigError(f"the network built from {directory / stored.CONFIG} describes differently from the one "
                          "that built the index (other weights or settings): queries would not be comparable")
    records = [ImageRecord(path, None) for path in queries]
    described, _ = describer.describe(records, None)
    rerank = cfg.get("rerank")
    wanted = top_k + 1 + (max(0, int(rerank.top_k) - top_k) if rerank else 0)  # +1: the query may be indexed
    rows = np.flatnonzero(described.valid)
    scores, ids = stored.search_index(index, described.descriptors[HEAD][rows], wanted, faiss_options.gpu,
                                      faiss_options.nprobe)
    ranked = []
    for row, line_scores, line_ids in zip(rows, scores, ids, strict=True):
        own = queries[row].resolve()
        ranked.append((queries[row], [(int(i), float(s), None) for i, s in zip(line_ids, line_scores, strict=True)
                                      if i >= 0 and Path(entries[int(i)].path).resolve() != own]))
    if rerank:
        ranked = _rerank(ranked, entries, rerank, describer, cfg)
    results = {str(query_path): [Neighbour(rank, image_id, entries[image_id].path, similarity, inliers)
                                 for rank, (image_id, similarity, inliers) in enumerate(kept[:top_k], start=1)]
               for query_path, kept in ranked}
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_results(output_dir / "results.csv", results)
    grid = [GridRow(Path(q), Path(q).name, None, tuple(Path(n.path) for n in found), (None,) * len(found),
                    tuple(n.caption for n in found)) for q, found in results.items() if found]
    if grid:
        draw_grid(grid, output_dir / "contact_sheet.png", f"top {top_k} in {directory.name}")
    skipped = {str(queries[i]): reason for i, reason in described.skipped.items()}
    write_search_page(output_dir / "results.html", results, skipped, "contact_sheet.png" if grid else None)
    return results


def _rerank(ranked, entries, rerank: DictConfig, describer: Describer, cfg: DictConfig):
    """Each query's first `rerank.top_k` neighbours re-ranked by inlier count with the evaluation's re-ranking
    (`index.local.rerank_rankings`): `[(query, [(image_id, similarity, inliers or None)])]`."""
    from hetretrieval.extraction.engine import ExtractionEngine
    from hetretrieval.index.local import LocalSearchOptions, rerank_rankings
    from hetretrieval.index.search import RankingBatch
    from hetretrieval.models.factory import build_head

    local = build_head(rerank.local, describer.backbone)
    engine = ExtractionEngine.from_options(None, {"rerank": local}, describer.options).to(describer.engine.device)
    search = typed(OmegaConf.create(OmegaConf.to_container(cfg.local_search, resolve=True)), LocalSearchOptions,
                   "local_search")
    verifier = instantiate(cfg.verification)
    depth = int(rerank.top_k)
    candidates = sorted({image_id for _, kept in ranked for image_id, _, _ in kept[:depth]})
    paths = [query for query, _ in ranked] + [Path(entries[i].path) for i in candidates]
    features = engine.extract([ImageRecord(p, None) for p in paths], describer.source).local_features["rerank"]
    by_id = dict(zip(candidates, features[len(ranked):], strict=True))
    reranked = []
    for row, (query_path, kept) in enumerate(ranked):
        head = [(i, s) for i, s, _ in kept[:depth] if by_id[i] is not None]
        if features[row] is None or not head:
            log.warning("not re-ranking %s: its local features or its neighbours' could not be described", query_path)
            reranked.append((query_path, kept))
            continue
        batch = RankingBatch(0, np.arange(len(head))[None], np.array([[s for _, s in head]]))
        (done,) = rerank_rankings([batch], [features[row]], [by_id[i] for i, _ in head], verifier, len(head),
                                  search.mutual, search.ratio)
        # re-ranked scores are 1 + inliers + (1 - previous rank / len(head)) / 2 (nothing below them was passed)
        order = [(head[p][0], head[p][1], round(float(s) - 1 - (1 - p / len(head)) / 2))
                 for p, s in zip(done.positions[0].tolist(), done.scores[0], strict=True)]
        verified = {i for i, _ in head}
        reranked.append((query_path, order + [n for n in kept if n[0] not in verified]))
    return reranked


def _write_results(path: Path, results: dict[str, list[Neighbour]]) -> None:
    write_csv(path, ["query", "rank", "image_id", "path", "similarity", "inliers"], (
        [query, n.rank, n.image_id, n.path, f"{n.similarity:.6f}", "" if n.inliers is None else n.inliers]
        for query, found in results.items() for n in found))
