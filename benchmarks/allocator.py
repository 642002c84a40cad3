"""What `hetretrieval.allocator.keep_freed_memory` (called by every CLI run) buys CPU extraction.

glibc's thresholds cannot be put back once raised, so each side runs in its own child process: children with
glibc's defaults and children with `keep_freed_memory()` alternate (default, kept, default, kept, ...). Each
child builds EfficientNet-Lite0 + GeM, makes one untimed warm-up pass of every way, then times
  extract  `ExtractionEngine.from_options(network, None, ExtractionOptions()).extract(records,
           ImageSource(max_size))`: the CLI's defaults (batches of 4 within 262,144 pixels; at 2 threads, 2
           one-thread streams);
  naive    one image at a time, `load_image` then `network(image[None])` (as cirtorch extracts);
on pacs-dev (the first `--per-class` images of every domain x class, 227 px) and heritage-wild (40 images,
max_size 512), at `--threads` torch threads, and reports wall seconds and the process's system (kernel) CPU
seconds over the timed passes. Prints, over the rounds, min and median of each, and the ratios of images/s
(of mins / of medians): each way kept/default, and extract kept / naive default (the engine as the CLI runs
it against a user's loop in a plain process).

    .venv/bin/python benchmarks/allocator.py [--rounds 3] [--threads 2] [--per-class 8]

Measured on the 2-core machine (3 rounds, 2 threads, 2026-12-03; ratios of images/s, of mins / of medians):
pacs-dev extract kept / default 1.047 / 1.219 (system CPU 0.12-0.14 s kept, 0.28-1.14 s default), naive 1.083 /
1.040, extract kept / naive default 1.614 / 1.641, extract kept / naive kept 1.491 / 1.579; heritage-wild extract
kept / default 0.998 / 1.011, naive 1.030 / 1.050, extract kept / naive default 1.516 / 1.555, kept / naive kept
1.472 / 1.481. With batches of 1 (the earlier default) pacs-dev extract gained 1.169 / 1.307 (system CPU 1.27-1.90
s default, 0.14 s kept) and naive 1.283 / 1.279. glibc's default thresholds move with what the process freed
first, so the default side varies from run to run; the kept side does not.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

from _interleave import print_ratio, print_times

from hetretrieval.allocator import GLIBC_MALLOC_VARIABLES

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
WAYS = ("extract", "naive")
SIDES = ("default", "kept")


def child(args: argparse.Namespace) -> None:
    """One process: time every way on both datasets, print `{dataset: {way: [wall, system CPU]}}` as JSON."""
    if args.child == "kept":
        from hetretrieval.allocator import keep_freed_memory

        if not keep_freed_memory():
            raise SystemExit("keep_freed_memory did nothing here (not glibc?)")
    import torch
    from extraction_throughput import heritage_wild, naive_loop, pacs_subset

    from hetretrieval.config import ExtractionOptions
    from hetretrieval.extraction.batching import ImageSource
    from hetretrieval.extraction.engine import ExtractionEngine
    from hetretrieval.models.backbones import Backbone
    from hetretrieval.models.network import RetrievalNetwork
    from hetretrieval.models.pooling.heads import GeM

    torch.set_num_threads(args.threads)
    network = RetrievalNetwork(Backbone("tf_efficientnet_lite0"), {"gem": GeM()}).eval()
    engine = ExtractionEngine.from_options(network, None, ExtractionOptions(), progress=False)
    found = {}
    for name, records, max_size in (("pacs-dev", pacs_subset(args.data / "pacs-dev", args.per_class), 800),
                                    ("heritage-wild", heritage_wild(args.data / "heritage-wild"), 512)):
        ways = {"extract": lambda records=records, max_size=max_size: engine.extract(records, ImageSource(max_size)),
                "naive": partial(naive_loop, network, records, max_size)}
        for run in ways.values():  # warm-up: every shape of the dataset seen once
            run()
        found[name] = {"images": len(records)}
        for way, run in ways.items():
            started, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_stime
            run()
            found[name][way] = [time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_stime - cpu]
    print(json.dumps(found))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="child processes of each side, alternating")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every child")
    parser.add_argument("--per-class", type=int, default=8, help="pacs-dev images per domain x class")
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding pacs-dev and heritage-wild")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    env = {name: value for name, value in os.environ.items()  # both sides start from glibc's defaults
           if name not in GLIBC_MALLOC_VARIABLES and name != "GLIBC_TUNABLES"}
    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    for round_ in range(args.rounds):
        for side in SIDES:
            done = subprocess.run([sys.executable, __file__, "--child", side, "--threads", str(args.threads),
                                   "--per-class", str(args.per_class), "--data", str(args.data)],
                                  capture_output=True, text=True, env=env)
            if done.returncode:
                raise SystemExit(f"child ({side}) failed:\n{done.stderr[-3000:]}")
            results[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1}, {side}: done", flush=True)
    print(f"\n{args.threads} torch thread(s), {args.rounds} child processes per side; wall s, then system CPU s")
    for name in results["default"][0]:
        count = results["default"][0][name]["images"]
        wall = {(side, way): [r[name][way][0] for r in results[side]] for side in SIDES for way in WAYS}
        system = {(side, way): [r[name][way][1] for r in results[side]] for side in SIDES for way in WAYS}
        print(f"\n{name}: {count} images")
        for key, seconds in wall.items():
            print_times(f"{key[1]}, {key[0]} heap", seconds, count)
            print_times("  system CPU of it", system[key])
        for way in WAYS:
            print_ratio(f"{way}: kept / default", wall[("kept", way)], wall[("default", way)], invert=True,
                        width=40)
        print_ratio("extract kept / naive default", wall[("kept", "extract")], wall[("default", "naive")],
                    invert=True, width=40)
        print_ratio("extract kept / naive kept", wall[("kept", "extract")], wall[("kept", "naive")],
                    invert=True, width=40)


if __name__ == "__main__":
    main()
