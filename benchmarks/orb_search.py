"""ORB local search on heritage-wild (512 px, ORB 1000): (a) tentative matching, (b) the whole local search.

(a) Packed XOR + popcount (faiss, `match_features_to_many`) vs unpacking bits to floats. The "unpacked" path
is the matcher before packed Hamming matching, kept here only as the baseline: bits unpacked to float32,
Hamming distances `|a| + |b| - 2 a.b` by one GEMM, then mutual NN / ratio test in torch. Each of the first
`--queries` JPEGs is matched to all the others; the script checks that both return exactly the same matches.

(b) `local_rankings` as `evaluate` runs it (`conf/local_search`, `conf/verification`: mutual matches, affine
RANSAC, backend auto) over the dataset of `conf/dataset/heritage_wild.yaml` (24 labelled queries, every
described image in the database): votes, then the mutual matches among the votes, verified, vs the same with
`vote_matches=False`, the search before: the same votes, then every shortlisted pair matched on its own
(`verify_pairs`). Prints both mAPs.

Timings are interleaved (benchmarks/_interleave.py), one thread.

    .venv/bin/python benchmarks/orb_search.py [--queries 3] [--max-size 512] [--repeats 3] [--only matching search]

Measured on the shared 2-core CPU, one thread: (a) 105 pairs, loaded machine, 2.92 vs 24.63 ms per pair at
min (8.4x), identical matches; (b) 24 queries x 38 images (888 pairs), quiet moment, 5 repeats: matches among
votes 1.53 s min / 1.57 s median vs every pair matched 3.10 / 3.17 s, time ratio 0.495 / 0.495; mAP 0.2487 vs
0.1779.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from hetretrieval.data.datasets import csv_manifest
from hetretrieval.data.images import load_image
from hetretrieval.index.local import LocalSearchOptions, local_rankings
from hetretrieval.metrics.retrieval import evaluate_rankings, search_protocol
from hetretrieval.models.local.matching import match_features_to_many
from hetretrieval.models.local.orb import extract_orb
from hetretrieval.models.local.ransac import GeometricVerifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _interleave import interleave, print_ratio, summary  # noqa: E402

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "heritage-wild"


def unpacked_matches(a: np.ndarray, b: np.ndarray, mutual: bool, ratio: float | None) -> np.ndarray:
    """The baseline: Hamming distance on unpacked float bits by one GEMM, then the `match_descriptors` rule."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    shifts = torch.arange(8, dtype=torch.uint8)
    bits_a, bits_b = (((torch.from_numpy(x).unsqueeze(-1) >> shifts) & 1).flatten(-2).float() for x in (a, b))
    distance = bits_a.sum(1, keepdim=True) + bits_b.sum(1) - 2 * bits_a @ bits_b.T
    nearest_distance, nearest = distance.min(dim=1)
    keep = torch.ones(len(a), dtype=torch.bool)
    if mutual:
        keep &= distance.argmin(dim=0)[nearest] == torch.arange(len(a))
    if ratio is not None and len(b) > 1:
        keep &= nearest_distance < ratio * distance.topk(2, dim=1, largest=False).values[:, 1]
    query = torch.nonzero(keep).squeeze(1)
    return torch.stack([query, nearest[query]], dim=1).numpy()


def matching(args: argparse.Namespace) -> None:
    names = sorted(p for p in ROOT.iterdir() if p.suffix.lower() in {".jpg", ".jpeg"})
    features = [extract_orb(load_image(path, max_size=args.max_size)) for path in names]
    pairs = [(q, [f for i, f in enumerate(features) if i != q]) for q in range(args.queries)]
    n_pairs = sum(len(others) for _, others in pairs)

    def packed() -> list[np.ndarray]:
        return [m for q, others in pairs
                for m in match_features_to_many(features[q], others, mutual=True, ratio=args.ratio)]

    def unpacked() -> list[np.ndarray]:
        return [unpacked_matches(features[q].descriptors, b.descriptors, True, args.ratio)
                for q, others in pairs for b in others]

    same = all(np.array_equal(x, y) for x, y in zip(packed(), unpacked(), strict=True))
    print(f"(a) {len(features)} images, ORB {int(np.median([len(f) for f in features]))} descriptors (median), "
          f"{n_pairs} pairs, mutual + ratio {args.ratio}; identical matches: {same}")
    timings = interleave({"packed (faiss popcount)": packed, "unpacked floats + GEMM": unpacked}, args.repeats)
    for label, seconds in timings.items():
        print(f"  {label:<26} {summary(seconds, n_pairs, unit='pairs/s')}   n={len(seconds)}")
        print(f"    {1000 * min(seconds) / n_pairs:.2f} ms per pair at min")
    print_ratio("unpacked / packed (time)", timings["unpacked floats + GEMM"], timings["packed (faiss popcount)"],
                width=26)


def search(args: argparse.Namespace) -> None:
    dataset = csv_manifest(ROOT / "labels.csv", name="heritage_wild", label_column="landmark", distractors=ROOT)
    features = [extract_orb(load_image(record.path, max_size=args.max_size)) for record in dataset.records]
    protocol = search_protocol(dataset.query_ids, dataset.database_ids, np.array([len(f) > 0 for f in features]))
    queries, database = ([features[i] for i in ids] for ids in (protocol.query_ids, protocol.database_ids))
    verifier = GeometricVerifier()

    def search_with(vote_matches: bool):
        options = LocalSearchOptions(vote_matches=vote_matches)
        return lambda: list(local_rankings(queries, database, protocol.exclude, verifier, options))

    runs = {"matches among votes": search_with(True), "every pair matched": search_with(False)}
    n_pairs = len(queries) * (len(database) - 1)
    print(f"(b) {len(queries)} queries x {len(database)} images ({n_pairs} pairs verified), "
          f"{verifier.model} RANSAC, backend {verifier.resolved_backend}")
    for label, run in runs.items():
        print(f"  {label:<30} mAP {np.nanmean(evaluate_rankings(run(), dataset.labels, protocol).ap):.4f}")
    timings = interleave(runs, args.repeats)
    for label, seconds in timings.items():
        print(f"  {label:<30} {summary(seconds, n_pairs, unit='pairs/s')}   n={len(seconds)}")
    print_ratio("among votes / every pair (time)", timings["matches among votes"], timings["every pair matched"],
                width=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=3)
    parser.add_argument("--max-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="+", choices=["matching", "search"], default=["matching", "search"])
    args = parser.parse_args()
    if not ROOT.is_dir():
        sys.exit(f"skipped: {ROOT} is absent")
    torch.set_num_threads(args.threads)
    import cv2
    import faiss

    faiss.omp_set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    for section in args.only:
        {"matching": matching, "search": search}[section](args)


if __name__ == "__main__":
    main()
