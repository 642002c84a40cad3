"""Descriptor extraction throughput: `ExtractionEngine.extract` vs the pure model forward vs a naive batch-1 loop.

Three ways of describing the same images with EfficientNet-Lite0 + GeM (`RetrievalNetwork`, one scale), timed
interleaved (extract, forward, naive, extract, forward, naive, ...) after one untimed warm-up round of each:

  extract  end to end: `ExtractionEngine(network, batch_size=4).extract(records, ImageSource(...))`, i.e. the
           header scan (`ImagePlan.scan`), decoding in the loader (num_workers 0), size-bucketed batches of 4,
           the forward pass and the collection of descriptors in record order;
  forward  the model alone: every batch of the same plan and loader decoded beforehand (untimed), then only
           `network(batch["images"])` per batch is timed: the ceiling of (a);
  naive    one image at a time, as cirtorch extracts: `load_image(path, max_size)` then `network(image[None])`.

The warm-up is a whole pass, not one batch: heritage-wild's images are of many sizes, and the first forward of
each new shape costs several times a later one (kernel selection, allocations).

Data: pacs-dev (the first `--per-class` images of every domain x class: 8 -> 224 images, all 227x227 at
max_size 800, one size bucket) and heritage-wild (all 40 images, max_size 512: 33 distinct shapes, so mostly
batches of one), from ../shared/data, at each of `--threads` torch thread counts. Prints min and median seconds
(and images/s) of each way, and the ratios extract/forward (issue target >= 0.85) and extract/naive of
images/s, of mins and of medians. About 3 minutes on the idle 2-core machine (`--quick`: about 1 minute); much
longer when other jobs share the cores, 2-thread runs most of all.

    .venv/bin/python benchmarks/extraction_throughput.py [--threads 1 2] [--repeats 3] [--per-class 8] [--quick]

Measured on the idle 2-core machine (defaults, 3.0 min; ratios of images/s, of mins / of medians):
pacs-dev 224 images: 1 thread extract 32.6 images/s, extract/forward 0.880/0.887, extract/naive 0.658/0.660;
2 threads 68.3 images/s, 0.937/0.939, 0.839/0.880. heritage-wild 40 images: 1 thread 11.8 images/s,
0.748/0.759, 0.849/0.835; 2 threads 17.0 images/s, 0.726/0.716, 0.914/0.916. The naive batch-1 loop beats
the engine's batches of 4 everywhere. Under load from other jobs the 2-thread rates fell 5-10x.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

import torch
from _interleave import interleave, print_ratio, print_times

from hetretrieval.data.datasets import csv_manifest, domain_folder
from hetretrieval.data.images import load_image
from hetretrieval.extraction.batching import ImagePlan, ImageSource
from hetretrieval.extraction.engine import ExtractionEngine
from hetretrieval.models.backbones import Backbone
from hetretrieval.models.network import RetrievalNetwork
from hetretrieval.models.pooling.heads import GeM

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def pacs_subset(root: Path, per_class: int) -> list:
    """The first `per_class` images (file order) of every domain x class of pacs-dev."""
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for record in domain_folder(root).records:
        groups[(record.metadata["domain"], record.label)].append(record)
    return [record for key in sorted(groups) for record in groups[key][:per_class]]


def heritage_wild(root: Path) -> list:
    """All 40 images of heritage-wild, built as conf/dataset/heritage_wild.yaml builds them."""
    dataset = csv_manifest(root / "labels.csv", root=root, name="heritage_wild", filename_column="filename",
                           label_column="landmark", distractors=root)
    return list(dataset.records)


def bench(name: str, records: list, max_size: int, network: RetrievalNetwork, batch_size: int,
          threads: list[int], repeats: int) -> list[tuple]:
    source = ImageSource(max_size=max_size)
    engine = ExtractionEngine(network, batch_size=batch_size, num_workers=0, progress=False)
    plan = ImagePlan.scan(records, source)
    if plan.unreadable:
        raise SystemExit(f"{name}: unreadable images {plan.unreadable}")
    batches = list(engine.loader(records, plan))  # decoded once, outside every timing
    shapes = {tuple(batch["images"].shape[-2:]) for batch in batches}
    n = len(records)
    print(f"\n{name}: {n} images, max_size {max_size}, {len(shapes)} distinct shapes, {len(batches)} batches "
          f"(batch size {batch_size})")

    def extract() -> None:
        extraction = engine.extract(records, source)
        assert extraction.valid.all(), extraction.skipped

    def forward() -> None:
        with torch.inference_mode():
            for batch in batches:
                network(batch["images"])

    def naive() -> None:
        with torch.inference_mode():
            for record in records:
                network(load_image(record.path, max_size)[None])

    rows = []
    for count in threads:
        torch.set_num_threads(count)
        print(f" {count} torch thread(s), {repeats} interleaved rounds after 1 warm-up round:")
        timings = interleave({"extract": extract, "forward": forward, "naive": naive}, repeats)
        print_times("(a) engine.extract", timings["extract"], n)
        print_times("(b) forward only (decoded)", timings["forward"], n)
        print_times("(c) naive batch-1 loop", timings["naive"], n)
        vs_forward = print_ratio("extract/forward images/s", timings["extract"], timings["forward"],
                                 ">= 0.85", invert=True)
        vs_naive = print_ratio("extract/naive images/s", timings["extract"], timings["naive"], invert=True)
        rows.append((name, count, n / statistics.median(timings["extract"]), *vs_forward, *vs_naive))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts")
    parser.add_argument("--repeats", type=int, default=3, help="timed interleaved rounds (after 1 warm-up)")
    parser.add_argument("--per-class", type=int, default=8, help="pacs-dev images per domain x class")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding pacs-dev and heritage-wild")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 4 pacs images per domain x class")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.per_class = 2, 4

    network = RetrievalNetwork(Backbone(args.backbone), {"gem": GeM()}).eval()
    print(f"{args.backbone} + GeM, scales (1.0,), device cpu, threads {args.threads}; times are wall seconds "
          f"per pass over the dataset; ratios are of images/s (the inverse ratio of the times)")
    rows = bench("pacs-dev", pacs_subset(args.data / "pacs-dev", args.per_class), 800, network,
                 args.batch_size, args.threads, args.repeats)
    rows += bench("heritage-wild", heritage_wild(args.data / "heritage-wild"), 512, network,
                  args.batch_size, args.threads, args.repeats)
    print("\nsummary (ratios of images/s: of mins / of medians)")
    print(f"  {'dataset':<14} {'threads':>7} {'extract img/s (median)':>23} {'extract/forward':>17} "
          f"{'extract/naive':>15}")
    for name, count, rate, fwd_min, fwd_med, naive_min, naive_med in rows:
        print(f"  {name:<14} {count:>7} {rate:>23.1f} {fwd_min:>8.3f}/{fwd_med:<8.3f} "
              f"{naive_min:>7.3f}/{naive_med:<7.3f}")


if __name__ == "__main__":
    main()
