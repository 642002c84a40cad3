"""Descriptor extraction throughput: size-bucketed batches vs one image at a time (cirtorch's way).

Prints the model's images/s (images decoded beforehand; one warm-up batch, best of `--repeats` passes) and peak
resident memory for each batch size, on real images: ../shared/data/pacs-dev when present (227x227), else the
built-in benchmark. Usage:
    python benchmarks/extraction_throughput.py [--backbone tf_efficientnet_lite0] [--images 256] [--batch-sizes 1 4 16]

Measured on the 2-core CPU machine (EfficientNet-Lite0 + GeM, 256 PACS images): batch 1: 60.8 images/s,
batch 4: 124.0 (2.04x), batch 16: 55.4, batch 32: 38.7; hence `extraction.batch_size: 4` by default on CPU.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from hetretrieval.data.builtin import builtin_benchmark
from hetretrieval.data.datamodule import RetrievalDataModule
from hetretrieval.data.datasets import domain_folder, make_dataset
from hetretrieval.models.backbones import Backbone
from hetretrieval.models.module import RetrievalModule
from hetretrieval.models.pooling.heads import GeM

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "pacs-dev"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--max-size", type=int, default=800)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    if SHARED.is_dir():
        dataset = domain_folder(SHARED)
    else:
        dataset = builtin_benchmark(Path(tempfile.gettempdir()) / "hetretrieval-bench")
    subset = make_dataset(dataset.name, dataset.records[: args.images])
    module = RetrievalModule(Backbone(args.backbone), GeM()).eval()
    print(f"{args.backbone} + GeM, {len(subset)} images of {dataset.name}, max_size {args.max_size}, "
          f"{torch.get_num_threads()} threads, device cpu")
    baseline = None
    for batch_size in args.batch_sizes:
        datamodule = RetrievalDataModule(subset, args.max_size, batch_size)
        datamodule.setup()
        batches = list(datamodule.predict_dataloader())  # decoding excluded: this measures the model
        with torch.inference_mode():
            module(batches[0]["images"])  # warm-up: kernel selection and allocations for this shape
            timings = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                for batch in batches:
                    module(batch["images"])
                timings.append(time.perf_counter() - started)
        rate = len(subset) / min(timings)
        baseline = baseline or rate
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"batch {batch_size:>3}: {rate:7.1f} images/s  ({rate / baseline:4.2f}x batch {args.batch_sizes[0]})  "
              f"best of {args.repeats}, peak RSS {peak_mib:.0f} MiB")

if __name__ == "__main__":
    main()
