"""Descriptor extraction throughput: `ExtractionEngine.extract` vs the pure model forward vs a naive batch-1 loop.

Ways of describing the same images with EfficientNet-Lite0 + GeM (`RetrievalNetwork`, one scale), timed
interleaved (extract, forward, streams, naive, ...) after one untimed warm-up round of each:

  extract  end to end: `ExtractionEngine(network, batch_size=b, batch_pixels=p).extract(records, ImageSource(...))`:
           the header scan (`ImagePlan.scan`), size-bucketed batches of b (at most p pixels), the forward passes
           and the collection of descriptors in record order. With one torch thread, decoding runs two batches
           ahead in a background thread; with more, in `extraction.streams` (default: one per thread) 1-thread forward
           streams, each decoding its own batches (`ExtractionEngine.stream_threads`);
  forward  the model alone on the same batch plan, in this thread at all torch threads: every batch decoded
           beforehand (untimed), then only `network(batch["images"])` per batch is timed (the issue's reference);
  streams  (more than one thread) the same predecoded forward passes run as extract runs them, in its
           streams: the ceiling of extract there (at 1 thread, forward is), whose remaining gap is the
           decoding's own CPU time;
  naive    one image at a time, as cirtorch extracts: `load_image(path, max_size)` then `network(image[None])`;
  1 stream (more than one thread) extract with `streams=1`: one forward pass on all threads, decoding in line;
  predict  (`--lightning`) the same engine driven by Lightning: `Trainer(accelerator="cpu").predict(
           ExtractionModule(...))`, as DDP and fast_dev_run evaluations run it (one stream).

`--batch-size 1 4` times extract and forward at each batch size (default: `ExtractionOptions().batch_size`,
the configured default), each batch capped at `--batch-pixels` pixels (default: `ExtractionOptions().batch_pixels`;
`none`: no cap). The warm-up is a whole pass, not one batch: heritage-wild's images are of many sizes, and the
first forward of each new shape costs several times a later one.

Data: pacs-dev (the first `--per-class` images of every domain x class: 8 -> 224 images, all 227x227 at
max_size 800, one size bucket) and heritage-wild (all 40 images, max_size 512: 33 distinct shapes, so mostly
batches of one), from ../shared/data, at each of `--threads` torch thread counts. Prints min and median seconds
(and images/s) of each way, and ratios of images/s (of mins, of medians): extract/forward and extract/streams
(issue 15 target >= 0.95; the summary's "extract/ceiling" is the former at 1 thread, the latter at more),
extract/naive (>= 1.0 at 1 thread, >= 1.3 at 2), extract/1 stream and predict/extract. About 6 minutes on
the idle 2-core machine (`--quick`: 2 rounds, 112 pacs images); much longer when other jobs share the cores,
2-thread runs most of all.

Every way runs with the heap the CLI sets (`hetretrieval.allocator.keep_freed_memory`: freed activations are
kept, not page-faulted back in each pass), the naive loop too, so the ratios compare the ways and not heaps;
`--glibc-defaults` leaves glibc's thresholds as they are (benchmarks/allocator.py compares the two heaps).

    .venv/bin/python benchmarks/extraction_throughput.py [--threads 1 2] [--batch-size 1 4] [--lightning] [--quick]

Measured on the 2-core machine, load ~1 (`--threads 1 2`, 3 rounds, the defaults: batches of 4 within 262,144
pixels, freed memory kept; ratios of images/s, of mins / of medians), two runs of 2026-12-03 (the first with
`--batch-size 1 4`): pacs-dev 1 thread 44.0-46.8 images/s, extract/forward 0.972/0.965 and 1.016/1.003,
extract/naive 1.139/1.121 and 1.224/1.227; 2 threads 81.0-83.1 images/s, extract/forward 1.037/1.048 and
1.074/1.110, extract/streams 0.893/0.893 and 0.907/0.951, extract/naive 1.533/1.582 and 1.639/1.677, extract/1
stream 1.148/1.162 and 1.237/1.255. heritage-wild (the cap leaves every batch one image) 1 thread 12.8-13.6
images/s, extract/forward 0.950/0.959 and 0.936/0.974, extract/naive 1.206/1.214 and 1.187/1.185; 2 threads
17.3-17.7 images/s, extract/forward 1.117/1.107 and 1.222/1.175, extract/streams 0.765/0.776 and 0.813/0.746,
extract/naive 1.354/1.352 and 1.528/1.399, extract/1 stream 1.471/1.473 and 1.606/1.562. Batch 4 / batch 1:
pacs-dev 1.134/1.123 at 1 thread, 1.231/1.235 at 2 (batch 1, the earlier default, reached extract/naive
1.246/1.281 at 2 threads); heritage-wild 1.003/1.002 and 1.028/1.075 (the same batches: the noise); uncapped
(`--batch-pixels none`) heritage-wild 0.954/0.951 and 0.937/0.841. Decoding in worker processes
(`num_workers=1`) instead was slower at 2 threads (pacs-dev 0.90x, heritage-wild 0.61x of the streams; batch 1,
glibc's default heap).
"""

from __future__ import annotations

import argparse
import logging
import statistics
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch
from _interleave import interleave, print_ratio, print_times

from hetretrieval.allocator import keep_freed_memory
from hetretrieval.config import ExtractionOptions
from hetretrieval.data.datasets import csv_manifest, domain_folder
from hetretrieval.data.images import load_image
from hetretrieval.extraction.batching import ImagePlan, ImageSource
from hetretrieval.extraction.engine import ExtractionEngine, in_threads
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


def bench(name: str, records: list, max_size: int, network: RetrievalNetwork, batch_sizes: list[int],
          threads: list[int], repeats: int, lightning: bool, batch_pixels: int | None) -> list[tuple]:
    source = ImageSource(max_size=max_size)
    plan = ImagePlan.scan(records, source)
    if plan.unreadable:
        raise SystemExit(f"{name}: unreadable images {plan.unreadable}")
    n = len(records)
    runs, multi_stream_runs = {}, {}  # the latter only where there are several streams (more than 1 thread)
    for size in batch_sizes:
        engine = ExtractionEngine(network, batch_size=size, batch_pixels=batch_pixels, num_workers=0, progress=False)
        one_stream = ExtractionEngine(network, batch_size=size, batch_pixels=batch_pixels, num_workers=0,
                                      progress=False, streams=1)
        batches = list(engine.loader(records, plan))  # decoded once, outside every timing
        shapes = {tuple(batch["images"].shape[-2:]) for batch in batches}
        print(f"\n{name}: {n} images, max_size {max_size}, {len(shapes)} distinct shapes, {len(batches)} batches "
              f"of up to {size} (batch_pixels {batch_pixels})")
        runs[f"extract b{size}"] = lambda engine=engine: _check(engine.extract(records, source))
        runs[f"forward b{size}"] = lambda batches=batches: _forward(network, batches)
        multi_stream_runs[f"streams b{size}"] = lambda batches=batches, engine=engine: _forward_in_streams(
            network, batches, engine)
        multi_stream_runs[f"extract b{size}, 1 stream"] = lambda one_stream=one_stream: _check(
            one_stream.extract(records, source))
        if lightning:
            runs[f"predict b{size}"] = lambda engine=engine: _predict(engine, records, source)

    runs["naive"] = partial(naive_loop, network, records, max_size)
    rows = []
    for count in threads:
        torch.set_num_threads(count)
        print(f" {count} torch thread(s), {repeats} interleaved rounds after 1 warm-up round:")
        timings = interleave({**runs, **(multi_stream_runs if count > 1 else {})}, repeats)
        for label, seconds in timings.items():
            print_times(label, seconds, n)
        naive_target = ">= 1.0" if count == 1 else ">= 1.3"
        for size in batch_sizes:
            extract = timings[f"extract b{size}"]
            vs_forward = print_ratio(f"b{size} extract/forward", extract, timings[f"forward b{size}"],
                                     ">= 0.95" if count == 1 else "", invert=True)
            if count > 1:  # at 1 thread the forward is already the one stream's
                vs_forward = print_ratio(f"b{size} extract/streams", extract, timings[f"streams b{size}"],
                                         ">= 0.95", invert=True)
            vs_naive = print_ratio(f"b{size} extract/naive", extract, timings["naive"], naive_target, invert=True)
            if count > 1:
                print_ratio(f"b{size} extract/1 stream", extract, timings[f"extract b{size}, 1 stream"], invert=True)
            if lightning:
                print_ratio(f"b{size} predict/extract", timings[f"predict b{size}"], extract, invert=True)
            rows.append((name, count, size, n / statistics.median(extract), *vs_forward, *vs_naive))
        for size in batch_sizes[1:]:
            print_ratio(f"extract b{size}/b{batch_sizes[0]}", timings[f"extract b{size}"],
                        timings[f"extract b{batch_sizes[0]}"], invert=True)
    return rows


def _check(extraction) -> None:
    assert extraction.valid.all(), extraction.skipped


def naive_loop(network: RetrievalNetwork, records: list, max_size: int) -> None:
    """One image at a time, as cirtorch extracts: `load_image` then `network(image[None])`."""
    with torch.inference_mode():
        for record in records:
            network(load_image(record.path, max_size)[None])


def _forward(network: RetrievalNetwork, batches: list[dict]) -> None:
    with torch.inference_mode():
        for batch in batches:
            network(batch["images"])


def _forward_in_streams(network: RetrievalNetwork, batches: list[dict], engine: ExtractionEngine) -> None:
    """The forward passes alone, run as `extract` runs them: in `engine.stream_threads()` streams."""
    for _ in in_threads(batches, lambda batch: _forward(network, [batch]), engine.stream_threads()):
        pass


def _predict(engine: ExtractionEngine, records: list, source: ImageSource) -> None:
    """The engine under a one-process CPU `Trainer`, as `hetretrieval-eval` runs it when Lightning drives."""
    import pytorch_lightning as pl

    from hetretrieval.extraction.lightning import ExtractionModule

    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # not "GPU available: ..." every round
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, use_distributed_sampler=False)
    module = ExtractionModule(engine, records, ImagePlan.scan(records, source))
    trainer.predict(module, return_predictions=False)
    _check(module.extraction)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts")
    parser.add_argument("--repeats", type=int, default=3, help="timed interleaved rounds (after 1 warm-up)")
    parser.add_argument("--per-class", type=int, default=8, help="pacs-dev images per domain x class")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[ExtractionOptions().batch_size],
                        help="extraction batch sizes to time (default: the configured default)")
    parser.add_argument("--batch-pixels", type=lambda value: None if value.lower() == "none" else int(value),
                        default=ExtractionOptions().batch_pixels,
                        help="pixels per batch at most, or none (default: the configured default)")
    parser.add_argument("--lightning", action="store_true", help="also time the Lightning predict path")
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding pacs-dev and heritage-wild")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 4 pacs images per domain x class")
    parser.add_argument("--glibc-defaults", action="store_true", help="leave glibc's heap thresholds as they are")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.per_class = 2, 4
    heap = "glibc defaults" if args.glibc_defaults or not keep_freed_memory() else "freed memory kept"

    network = RetrievalNetwork(Backbone(args.backbone), {"gem": GeM()}).eval()
    print(f"{args.backbone} + GeM, scales (1.0,), device cpu, threads {args.threads}, heap: {heap}; times are wall "
          f"seconds per pass over the dataset; ratios are of images/s (the inverse ratio of the times)")
    rows = bench("pacs-dev", pacs_subset(args.data / "pacs-dev", args.per_class), 800, network,
                 args.batch_size, args.threads, args.repeats, args.lightning, args.batch_pixels)
    rows += bench("heritage-wild", heritage_wild(args.data / "heritage-wild"), 512, network,
                  args.batch_size, args.threads, args.repeats, args.lightning, args.batch_pixels)
    print("\nsummary (ratios of images/s: of mins / of medians)")
    print(f"  {'dataset':<14} {'threads':>7} {'batch':>5} {'extract img/s (median)':>23} {'extract/ceiling':>17} "
          f"{'extract/naive':>15}")
    for name, count, size, rate, fwd_min, fwd_med, naive_min, naive_med in rows:
        print(f"  {name:<14} {count:>7} {size:>5} {rate:>23.1f} {fwd_min:>8.3f}/{fwd_med:<8.3f} "
              f"{naive_min:>7.3f}/{naive_med:<7.3f}")


if __name__ == "__main__":
    main()
