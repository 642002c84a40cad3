"""Search at scale: exact ranking before/after, exact full ranking at 100k, IVF-PQ on a 1M database.

Synthetic L2-normalised descriptors with structure, as real ones have (a low intrinsic dimension, classes): a
Gaussian mixture in a 32-d latent space (`n / 100` standard-normal centres, within-cluster std 0.5), mapped to D
dimensions by a fixed random projection, L2-normalised, plus isotropic noise of norm 0.05, re-normalised; a
point's class is its cluster. Generated in 10k chunks (seeded); every timing is wall time on this machine,
interleaved where two things are compared.

Sections (each in its own process, so that its peak RSS is its own):
  before_after  10k database x 1k queries, D=512 and 2048: the evaluation of every query (AP, P@k, R@k, top-100)
                by today's `evaluate_retrieval` (GEMM blocks, AP from the positives' ranks, stable top-k; no
                argsort), by `iter_rankings` + `evaluate_rankings` (GEMM + full stable argsort), and by the
                BASELINE below (the implementation before this change: faiss `IndexFlatIP.search(k=N)`, then a
                stable argsort moving the excluded entry last), with the largest AP difference between them.
  exact_100k    100k database, a measured query sample, D=512 and 2048: `evaluate_retrieval` (and the BASELINE
                on a smaller sample), extrapolated to 100k queries, and the section's peak RSS.
  ivfpq_1m      1M database, D=512 (1M x 2048 float32 is 8 GB: too much for this machine's shared 24 GB), 1k
                queries: exact top-100 (`similarity_batches` + `stable_top_k`) against IVF-PQ (a short-list of
                1000, `--shortlist`, exactly re-scored, `approximate_rankings`): recall@100 against exact, search
                time ratio, index size against the flat float32 vectors; the same on GPU when faiss sees one
                (else said so).

    .venv/bin/python benchmarks/search_scale.py            # every section (~10 min idle)
    .venv/bin/python benchmarks/search_scale.py --quick    # smoke run: small sizes (~1 min)
    .venv/bin/python benchmarks/search_scale.py --only exact_100k
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _interleave import interleave, print_ratio, print_times  # noqa: E402

from hetretrieval.index.search import (  # noqa: E402
    RankingBatch,
    approximate_parameters,
    approximate_rankings,
    build_approximate_index,
    build_flat_index,
    iter_rankings,
    on_gpus,
    similarity_batches,
    stable_top_k,
)
from hetretrieval.metrics.retrieval import evaluate_rankings, evaluate_retrieval, search_protocol  # noqa: E402

SECTIONS = ("before_after", "exact_100k", "ivfpq_1m")


def baseline_iter_rankings(queries, database, exclude=None, max_batch_entries=1 << 24):
    """BASELINE, kept here only to be measured: `index/search.py`'s `iter_rankings` before blocked GEMM."""
    n_database = database.shape[0]
    index = build_flat_index(database)
    batch = max(1, max_batch_entries // max(n_database, 1))
    for start in range(0, queries.shape[0], batch):
        block = np.ascontiguousarray(queries[start : start + batch], dtype=np.float32)
        scores, positions = index.search(block, n_database)
        if exclude is not None:
            dropped = positions == exclude[start : start + batch, None]
            order = np.argsort(dropped, axis=1, kind="stable")
            positions = np.take_along_axis(positions, order, axis=1)
            scores = np.where(np.take_along_axis(dropped, order, axis=1), -np.inf,
                              np.take_along_axis(scores, order, axis=1))
        yield RankingBatch(start, positions, scores)


def clustered(n: int, dim: int, seed: int, n_clusters: int | None = None, latent: int = 32, spread: float = 0.5,
              noise: float = 0.05, chunk: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
    """`(n, dim)` float32 unit vectors with structure, and their cluster (see the module docstring)."""
    structure = np.random.default_rng(dim)  # centres and projection shared by every set of this dim
    projection = structure.standard_normal((latent, dim), dtype=np.float32) / np.sqrt(latent)
    centres = structure.standard_normal((n_clusters or max(1, n // 100), latent), dtype=np.float32)
    rng = np.random.default_rng(seed)
    labels = rng.integers(len(centres), size=n)
    vectors = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        rows = labels[start : start + chunk]
        points = (centres[rows] + spread * rng.standard_normal((rows.size, latent), dtype=np.float32)) @ projection
        points /= np.linalg.norm(points, axis=1, keepdims=True)
        points += rng.standard_normal(points.shape, dtype=np.float32) * (noise / np.sqrt(dim))
        vectors[start : start + chunk] = points / np.linalg.norm(points, axis=1, keepdims=True)
    return vectors, labels


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _protocol_inputs(n_database: int, n_queries: int, dim: int):
    vectors, clusters = clustered(n_database, dim, seed=0)
    labels = [str(c) for c in clusters]
    return vectors, labels, np.arange(n_queries), np.arange(n_database)


def before_after(args) -> None:
    n_database, n_queries = (2000, 200) if args.quick else (10_000, 1000)
    dim = args.dim
    vectors, labels, query_ids, database_ids = _protocol_inputs(n_database, n_queries, dim)
    protocol = search_protocol(query_ids, database_ids, np.ones(n_database, dtype=bool))
    queries, database = vectors[query_ids], vectors
    results = {}

    def new():
        results["new"] = evaluate_retrieval(vectors, labels, query_ids, database_ids)

    def full_sort():
        results["full_sort"] = evaluate_rankings(iter_rankings(queries, database, protocol.exclude), labels,
                                                 protocol)

    def baseline():
        results["baseline"] = evaluate_rankings(baseline_iter_rankings(queries, database, protocol.exclude),
                                                labels, protocol)

    print(f"\n== before_after: {n_database} database x {n_queries} queries, D={dim} "
          f"(evaluation of every query: AP, P@k, R@k, top-100)")
    timings = interleave({"new": new, "full_sort": full_sort, "baseline": baseline}, repeats=args.repeats)
    for name, seconds in timings.items():
        print_times(name, seconds)
    print_ratio("baseline / new", timings["baseline"], timings["new"], target=">= 3")
    print_ratio("baseline / full_sort", timings["baseline"], timings["full_sort"])
    for name in ("new", "full_sort"):
        ap_diff = np.nanmax(np.abs(results[name].ap - results["baseline"].ap))
        p_diff = np.max(np.abs(results[name].precision[10] - results["baseline"].precision[10]))
        print(f"  {name}: max |AP - baseline AP| {ap_diff:.2e}, max |P@10 - baseline| {p_diff:.2e}")


def exact_100k(args) -> None:
    n_database, dim = 20_000 if args.quick else 100_000, args.dim
    sample, baseline_sample = (200, 50) if args.quick else (args.sample, args.sample // 5)
    vectors, labels, _, database_ids = _protocol_inputs(n_database, n_database, dim)
    query_ids = np.random.default_rng(1).choice(n_database, sample, replace=False)
    print(f"\n== exact_100k: {n_database} database, D={dim}, {sample} queries measured "
          f"(baseline {baseline_sample}), extrapolated linearly to {n_database} queries")
    print(f"  peak RSS with the data generated: {peak_rss_gb():.2f} GB")
    started = time.perf_counter()
    evaluate_retrieval(vectors, labels, query_ids, database_ids)
    new = time.perf_counter() - started
    print(f"  peak RSS after the new evaluation: {peak_rss_gb():.2f} GB")
    protocol = search_protocol(query_ids[:baseline_sample], database_ids, np.ones(n_database, dtype=bool))
    started = time.perf_counter()
    evaluate_rankings(baseline_iter_rankings(vectors[protocol.query_ids], vectors, protocol.exclude), labels,
                      protocol)
    old = time.perf_counter() - started
    print(f"  peak RSS after the baseline: {peak_rss_gb():.2f} GB")
    scale_new, scale_old = n_database / sample, n_database / baseline_sample
    print(f"  new       {new:8.2f} s for {sample} queries -> {new * scale_new / 60:7.1f} min for "
          f"{n_database} (target <= 15 min at 100k)")
    print(f"  baseline  {old:8.2f} s for {baseline_sample} queries -> {old * scale_old / 60:7.1f} min")
    print(f"  baseline / new per query: {(old / baseline_sample) / (new / sample):.2f}")


def ivfpq_1m(args) -> None:
    import faiss

    n_database, n_queries = (100_000, 200) if args.quick else (1_000_000, 1000)
    dim, shortlist, top = args.dim, args.shortlist, 100
    database, _ = clustered(n_database, dim, seed=7)
    queries, _ = clustered(n_queries, dim, seed=8, n_clusters=n_database // 100)  # the database's clusters
    print(f"\n== ivfpq_1m: {n_database} database x {n_queries} queries, D={dim}, short-list {shortlist}, top {top}")
    print(f"  generated; peak RSS {peak_rss_gb():.2f} GB")
    options = SimpleNamespace(search="ivfpq", shortlist=shortlist, ivf_lists=args.ivf_lists, pq_m=None,
                              nprobe=args.nprobe, hnsw_m=32, ef_search=None)
    parameters = approximate_parameters(options, n_database, dim)
    started = time.perf_counter()
    index = build_approximate_index(database, parameters)
    print(f"  {parameters}: trained and filled in {time.perf_counter() - started:.1f} s")
    index_bytes, flat_bytes = faiss.serialize_index(index).size, database.nbytes
    print(f"  index {index_bytes / 2**20:.1f} MiB vs flat float32 {flat_bytes / 2**20:.1f} MiB: "
          f"{flat_bytes / index_bytes:.1f}x smaller (target >= 16)")
    exact = {}

    def exact_top():  # 64 queries a pass over the database (evaluation.max_batch_entries = 2^26)
        exact["positions"] = np.concatenate([stable_top_k(scores, top)[0]
                                             for _, scores in similarity_batches(queries, database, None, 1 << 26)])

    approximate = {}

    def approximate_top(search_index=index):
        approximate["positions"] = np.concatenate(
            [b.positions[:, :top] for b in approximate_rankings(search_index, queries, database, shortlist)])

    timings = interleave({"exact top-100": exact_top, "ivfpq": approximate_top}, repeats=args.repeats, warmup=0)
    for name, seconds in timings.items():
        print_times(name, seconds, width=16)
    print(f"  ({n_queries / min(timings['ivfpq']):.0f} queries/s ivfpq, "
          f"{n_queries / min(timings['exact top-100']):.0f} exact, at min)")
    print_ratio("exact / ivfpq", timings["exact top-100"], timings["ivfpq"], target=">= 10", width=16)
    recall = np.mean([np.intersect1d(a, e).size / top for a, e in zip(approximate["positions"], exact["positions"],
                                                                        strict=True)])
    print(f"  recall@{top} against exact: {recall:.4f} (target >= 0.95)")
    print(f"  peak RSS of the section: {peak_rss_gb():.2f} GB")
    gpu_index, device = on_gpus(index, shortlist + 1)
    if device != "gpu":
        print("  GPU: skipped (faiss sees no GPU here)")
        return
    gpu = interleave({"exact top-100": exact_top, "ivfpq gpu": lambda: approximate_top(gpu_index)},
                     repeats=args.repeats)
    print_ratio("exact (cpu) / ivfpq (gpu)", gpu["exact top-100"], gpu["ivfpq gpu"], width=16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sample", type=int, default=1000, help="exact_100k: queries measured")
    parser.add_argument("--ivf-lists", type=int, default=None, help="ivfpq_1m: null: the default for N")
    parser.add_argument("--nprobe", type=int, default=None, help="ivfpq_1m: null: the default (lists / 64)")
    parser.add_argument("--shortlist", type=int, default=1000, help="ivfpq_1m: candidates re-scored exactly "
                        "(evaluation.shortlist, its default; 300 is enough for the top-100 alone)")
    parser.add_argument("--dim", type=int, default=None, help="before_after / exact_100k: one D (default 512 and "
                        "2048; 512 alone with --quick)")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process:
        for section in args.only:
            globals()[section](args)
        return
    for section in args.only:  # one process per section and D: its peak RSS is its own
        dims = [args.dim] if args.dim else [512] if args.quick or section == "ivfpq_1m" else [512, 2048]
        for dim in dims:
            command = [sys.executable, __file__, "--in-process", "--only", section, "--repeats", str(args.repeats),
                       "--sample", str(args.sample), "--dim", str(dim)]
            command += ["--quick"] * args.quick
            command += ["--ivf-lists", str(args.ivf_lists)] if args.ivf_lists else []
            command += ["--nprobe", str(args.nprobe)] if args.nprobe else []
            command += ["--shortlist", str(args.shortlist)]
            subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
