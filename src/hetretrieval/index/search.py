"""Global-descriptor search: exact similarities in bounded blocks, full rankings, exact top-k, approximate short-lists.

Evaluation needs every positive's rank (AP over the whole ranking), but a dense `Q x N` similarity matrix does not
fit for large collections. `similarity_batches` yields the exact inner products of one query batch at a time,
about `max_batch_entries` of them (at least one row of N), by a float32 GEMM over database blocks. The GEMM is
torch's (MKL on x86): identical descriptors score identically there, which AP's tie rule needs and OpenBLAS's
and faiss's edge kernels do not guarantee. A writable float32 array is read in place; any other (float16, a
read-only memory map) is converted one block of about `max_batch_entries` values at a time, never whole. The
query's own entry gets -inf before anything is sorted, so no second sort moves it. `iter_rankings` sorts each
batch (stable: ties keep the lower database position first); `stable_top_k` gives the same first k without a
full sort.

`approximate_rankings` is the large-database search (`evaluation.search: ivfpq | hnsw`): a faiss IVF-PQ (on every
GPU when faiss has any) or HNSW index proposes a short-list per query, which is re-scored exactly and sorted as
the exact search would; the rankings are truncated to the short-list.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from hetretrieval.errors import ConfigError

if TYPE_CHECKING:
    import faiss  # imported where used: faiss stays out of import time

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankingBatch:
    """Rankings of a batch of queries: `positions (b, R)` into the database, `scores (b, R)` descending.

    R is the database size N (a full ranking) except after an approximate search (the short-list).
    """

    start: int
    positions: np.ndarray
    scores: np.ndarray


def build_flat_index(database: np.ndarray) -> faiss.Index:
    """An exact inner-product index over L2-normalised database descriptors `(N, D)`."""
    import faiss

    index = faiss.IndexFlatIP(database.shape[1])
    index.add(np.ascontiguousarray(database, dtype=np.float32))
    return index


def select_rows(descriptors: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """`descriptors[ids]`, as a view when the ids are consecutive (no copy of the database, of a memory map)."""
    if ids.size and np.all(np.diff(ids) == 1):
        return descriptors[ids[0] : ids[-1] + 1]
    return descriptors[ids]


def similarity_batches(
    queries: np.ndarray, database: np.ndarray, exclude: np.ndarray | None = None,
    max_batch_entries: int = 1 << 24,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield `(start, scores (b, N))`: the exact float32 inner products of queries `start .. start + b` with the
    database `(N, D)`, `exclude[q]` (a database position, or -1) set to -inf. Each batch is a fresh array the
    caller may overwrite.

    A batch holds about `max_batch_entries` similarities, at least one row; a database that is not a writable
    float32 array is converted block by block (see the module docstring).
    """
    n_database, dim = database.shape
    batch = max(1, max_batch_entries // max(n_database, 1))
    in_place = database.dtype == np.float32 and database.flags.c_contiguous and database.flags.writeable
    rows = n_database if in_place else max(1, max_batch_entries // max(dim, 1))
    for start in range(0, queries.shape[0], batch):
        block_queries = torch.from_numpy(np.array(queries[start : start + batch], dtype=np.float32))
        scores = np.empty((block_queries.shape[0], n_database), dtype=np.float32)
        for first in range(0, n_database, rows):
            block = database if in_place else np.array(database[first : first + rows], dtype=np.float32)
            torch.mm(block_queries, torch.from_numpy(block).T,
                     out=torch.from_numpy(scores)[:, first : first + block.shape[0]])
        if exclude is not None:
            dropped = np.asarray(exclude[start : start + batch])
            kept = np.flatnonzero(dropped >= 0)
            scores[kept, dropped[kept]] = -np.inf
        yield start, scores


def iter_rankings(
    queries: np.ndarray, database: np.ndarray, exclude: np.ndarray | None = None,
    max_batch_entries: int = 1 << 24,
) -> Iterator[RankingBatch]:
    """Yield the full database ranking of each query batch: `(Q, D), (N, D) -> b x (N,)` per batch.

    `exclude[q]` is a database position to drop from query q's ranking (the query itself), or -1: it scores
    -inf, so it comes last and every row keeps length N (AP/P@k are unaffected). Ties keep the lower database
    position first; tie-aware metrics do not depend on it.
    """
    for start, scores in similarity_batches(queries, database, exclude, max_batch_entries):
        positions = np.argsort(-scores, axis=1, kind="stable")
        yield RankingBatch(start, positions, np.take_along_axis(scores, positions, axis=1))


def stable_top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `k` entries of the stable descending ranking of each row, without sorting the rows:
    `(b, N) -> positions (b, k'), scores (b, k')`, `k' = min(k, N)`; ties keep the lower position first."""
    n_database = scores.shape[1]
    k = min(k, n_database)
    if k < n_database:  # torch's top-k holds (b, k), not the (b, N) indices of a partition
        values, positions = (t.numpy() for t in torch.topk(torch.from_numpy(scores), k, dim=1, sorted=False))
        # rows where ties straddle the cut: top-k may have kept any of the tied entries
        for row in np.flatnonzero(np.count_nonzero(scores >= values.min(axis=1)[:, None], axis=1) > k):
            positions[row] = np.argsort(-scores[row], kind="stable")[:k]
            values[row] = scores[row, positions[row]]
    else:
        positions = np.broadcast_to(np.arange(n_database), scores.shape)
        values = scores
    order = np.lexsort((positions, -values), axis=1)
    return np.take_along_axis(positions, order, axis=1), np.take_along_axis(values, order, axis=1)


class ApproximateSearch(Protocol):
    """What `approximate_rankings` needs (`hetretrieval.config.EvaluationOptions` has it); None: the default
    for the database size (`approximate_parameters`)."""

    search: str
    shortlist: int
    ivf_lists: int | None
    pq_m: int | None
    nprobe: int | None
    hnsw_m: int
    ef_search: int | None


def approximate_parameters(options: ApproximateSearch, n_database: int, dim: int) -> dict:
    """The index parameters for a `(n_database, dim)` database: the options, defaults filled in.

    ivfpq: `ivf_lists` min(4 sqrt(N), N / 39) (faiss asks ~39 training vectors a list), `pq_m` the largest
    divisor of D up to D / 8 (code bytes a vector), `pq_bits` 8 from 10k vectors (fewer below, as the local
    PQ index), `nprobe` ivf_lists / 64, at least 16 (at most every list); hnsw: `ef_search` 2 x the short-list,
    never below it (it bounds how many results come back).
    """
    shortlist = min(options.shortlist, n_database)
    if options.search == "hnsw":
        return {"method": "hnsw", "shortlist": shortlist, "hnsw_m": options.hnsw_m,
                "ef_search": max(options.ef_search or 2 * shortlist, shortlist + 1)}
    lists = options.ivf_lists or max(1, min(round(4 * math.sqrt(n_database)), n_database // 39))
    pq_m = options.pq_m or max(m for m in range(1, max(dim // 8, 1) + 1) if dim % m == 0)
    if dim % pq_m:
        raise ConfigError(f"evaluation.pq_m={pq_m} must divide the descriptor dimension {dim}")
    if lists > n_database:
        raise ConfigError(f"evaluation.ivf_lists={lists} exceeds the database size {n_database}")
    return {"method": "ivfpq", "shortlist": shortlist, "ivf_lists": lists, "pq_m": pq_m,
            "pq_bits": min(8, max(1, int(np.log2(max(n_database, 1) / 39)))),
            "nprobe": min(options.nprobe or max(16, lists // 64), lists)}


def build_approximate_index(database: np.ndarray, parameters: dict, seed: int = 0,
                            max_batch_entries: int = 1 << 24) -> faiss.Index:
    """The trained and filled (CPU) faiss index of `approximate_parameters` over `database (N, D)`.

    HNSW keeps 8-bit scalar-quantised codes, not a float32 copy of the database (a quarter of its size; the
    short-list is re-scored from the database anyway). IVF-PQ trains on a seeded sample of 39 vectors (faiss's
    minimum) a list or a PQ centroid, whichever needs more, HNSW its per-dimension ranges on 39 x 256; vectors are
    added in float32 blocks.
    """
    import faiss

    n_database, dim = database.shape
    if parameters["method"] == "hnsw":
        index = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_8bit, parameters["hnsw_m"],
                                  faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = max(40, 2 * parameters["hnsw_m"])
        index.hnsw.efSearch = parameters["ef_search"]
        training = 39 * 256
    else:
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, parameters["ivf_lists"], parameters["pq_m"],
                                 parameters["pq_bits"], faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = index.pq.cp.seed = seed
        index.nprobe = parameters["nprobe"]
        training = 39 * max(parameters["ivf_lists"], 2 ** parameters["pq_bits"])
    sample = np.sort(np.random.default_rng(seed).permutation(n_database)[:training])
    index.train(np.ascontiguousarray(database[sample], dtype=np.float32))
    rows = max(1, max_batch_entries // max(dim, 1))
    for start in range(0, n_database, rows):
        index.add(np.ascontiguousarray(database[start : start + rows], dtype=np.float32))
    return index


GPU_MAX_K = 2048  # faiss's GPU k-selection handles at most this many results a query


def on_gpus(index: faiss.Index, k: int, gpu: str = "auto") -> tuple[faiss.Index, str]:
    """The index on every GPU, to be searched for `k` results a query, when faiss has a GPU and `gpu` allows it
    (`auto`; `false`: never; `true`: a GPU is required), else itself: `(index, "gpu" | "cpu")`.

    An index the GPU kernels cannot hold (HNSW, some `pq_m`) or a `k` above `GPU_MAX_K` stays on the CPU, said
    in a warning, rather than failing in the middle of the search.
    """
    import faiss

    gpu = str(gpu).lower()
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if gpu == "true" and not gpus:
        raise ConfigError("faiss.gpu=true but faiss sees no GPU (faiss-gpu and CUDA are needed)")
    if not gpus or gpu == "false":
        return index, "cpu"
    if k > GPU_MAX_K:
        log.warning("the faiss index stays on the CPU: %d results a query exceed the GPU's limit of %d", k, GPU_MAX_K)
        return index, "cpu"
    try:
        return faiss.index_cpu_to_all_gpus(index), "gpu"
    except RuntimeError as error:
        log.warning("the faiss index stays on the CPU: %s", str(error).splitlines()[0])
    return index, "cpu"


def approximate_rankings(
    index: faiss.Index, queries: np.ndarray, database: np.ndarray, shortlist: int,
    exclude: np.ndarray | None = None, max_batch_entries: int = 1 << 24,
) -> Iterator[RankingBatch]:
    """Short-list rankings `b x (min(shortlist, N),)` per batch: queries `(Q, D)` searched in `index` (built over
    `database (N, D)`), the candidates re-scored exactly and ranked as `iter_rankings` ranks them.

    `exclude[q]` (or -1) is never in the list, unless the list covers the database: then last, at -inf. Where
    the index returns fewer candidates than asked, unretrieved positions complete the list at -inf.
    """
    n_database, dim = database.shape
    width = min(shortlist, n_database)
    wanted = min(width + (exclude is not None), n_database)
    search_batch = max(1, max_batch_entries // wanted)
    rescore_batch = max(1, max_batch_entries // (wanted * max(dim, 1)))
    for start in range(0, queries.shape[0], search_batch):
        block = np.ascontiguousarray(queries[start : start + search_batch], dtype=np.float32)
        candidates, missing = _completed(index.search(block, wanted)[1])
        order = np.argsort(candidates, axis=1, kind="stable")  # ascending: ties keep the lower position first
        candidates, missing = np.take_along_axis(candidates, order, 1), np.take_along_axis(missing, order, 1)
        scores = np.empty(candidates.shape, dtype=np.float32)
        for first in range(0, block.shape[0], rescore_batch):  # one gather (the cost) and a batched dot product
            rows = slice(first, first + rescore_batch)
            vectors = database.take(candidates[rows].ravel(), axis=0).astype(np.float32, copy=False)
            scores[rows] = np.einsum("bkd,bd->bk", vectors.reshape(*candidates[rows].shape, dim), block[rows])
        dropped = missing
        if exclude is not None:
            dropped = missing | (candidates == np.asarray(exclude[start : start + search_batch])[:, None])
        scores[dropped] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :width]
        yield RankingBatch(start, np.take_along_axis(candidates, order, axis=1),
                           np.take_along_axis(scores, order, axis=1))


def _completed(candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """faiss's candidates `(b, k)` with each -1 (fewer results than asked) replaced by the lowest position
    missing from its row, and the mask of those replacements."""
    missing = candidates < 0
    for row in np.flatnonzero(missing.any(axis=1)):
        found = candidates[row][~missing[row]]
        candidates[row, missing[row]] = np.setdiff1d(np.arange(candidates.shape[1] + found.size), found)[
            : int(missing[row].sum())]
    return candidates, missing
