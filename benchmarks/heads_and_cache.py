"""Many heads per backbone pass, and the descriptor store: what they save, measured as interleaved ratios.

(a) heads   `ExtractionEngine.extract` with 4 global heads (mac, spoc, gem, rmac) in one `RetrievalNetwork`
            against the same engine with gem alone, same backbone and images, interleaved (4, 1, 4, 1, ...)
            after one untimed warm-up round: heritage-wild (40 images, max_size 512) and a pacs-dev subset
            (`--per-class` images of every domain x class, 227 px, max_size 800). Ratio of wall times
            4-head / 1-head: target <= 1.3. The gem descriptors of both runs are checked to be equal.
(b) cache   `evaluate(cfg)` (the hetretrieval-eval CLI, in process) on heritage-wild with `pooling=gem`: a miss
            (a new, empty `paths.cache_dir`) then a hit (the same cache dir), interleaved (miss, hit, miss,
            hit, ...), each run with its own output dir. Ratios hit/miss of `timings.extraction_s` (target
            <= 0.05; on a hit it is the time to read the store) and of each run's total wall time.
(c) CLI     one run `heads=[mac,spoc,gem,rmac]` against four runs `pooling=mac`, ..., `pooling=rmac`, all
            `cache=false` and each with its own output dir, interleaved (4-head run, the 4 single runs, ...).
            Wall time of each side and the ratio (4-head run) / (4 single runs).

CLI runs use `dataset=heritage_wild logger=csv evaluation.report=false` and the config's extraction settings
(max_size 800, batch_size 4) unless `--cli-max-size` is given; one untimed 4-head run warms (b) and (c) up
(imports, kernels for every image shape). Times are wall seconds; min and median of each side and the ratios
of mins and of medians are printed. About 2.5 minutes on the idle 2-core machine (`--quick`: about 1.5 minutes).

    .venv/bin/python benchmarks/heads_and_cache.py [--threads 2] [--repeats 3] [--cli-repeats 2] [--quick]
                                                   [--only heads cache cli]

Measured on the idle 2-core machine (defaults, 2 threads, 2.25 min; of mins / of medians): (a) 4-head/1-head
wall 1.046/1.079 (heritage-wild), 1.069/1.017 (pacs-dev, 140 images); (b) hit/miss extraction_s 0.000/0.000
(0.001 s vs 5.4-6.5 s), run wall 0.027/0.024; (c) 4-head run / 4 single runs 0.276/0.277 (6.1 s vs 22.0 s).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _interleave import interleave, print_ratio, print_times
from extraction_throughput import DATA, heritage_wild, pacs_subset

from hetretrieval.extraction.batching import ImageSource
from hetretrieval.extraction.engine import ExtractionEngine
from hetretrieval.models.backbones import Backbone
from hetretrieval.models.network import RetrievalNetwork
from hetretrieval.models.pooling.heads import MAC, RMAC, GeM, SPoC

HEADS = ("mac", "spoc", "gem", "rmac")


def heads_section(backbone: Backbone, data: Path, per_class: int, repeats: int) -> None:
    print("\n(a) 4 global heads in one extraction vs gem alone (ExtractionEngine.extract, batch size 4)")
    gem = GeM()
    four = ExtractionEngine(RetrievalNetwork(backbone, {"mac": MAC(), "spoc": SPoC(), "gem": gem, "rmac": RMAC()}),
                            progress=False)
    one = ExtractionEngine(RetrievalNetwork(backbone, {"gem": gem}), progress=False)
    for name, records, max_size in (("heritage-wild", heritage_wild(data / "heritage-wild"), 512),
                                    ("pacs-dev", pacs_subset(data / "pacs-dev", per_class), 800)):
        source = ImageSource(max_size=max_size)
        results = {}

        def run(engine: ExtractionEngine, key: str, records=records, source=source, results=results):
            def extract() -> None:
                results[key] = engine.extract(records, source)
            return extract

        print(f" {name}: {len(records)} images, max_size {max_size}, {repeats} interleaved rounds after 1 warm-up")
        timings = interleave({"4 heads": run(four, "4"), "1 head": run(one, "1")}, repeats)
        same = np.allclose(results["4"].descriptors["gem"], results["1"].descriptors["gem"], atol=1e-6)
        print_times("4 heads (mac,spoc,gem,rmac)", timings["4 heads"], len(records))
        print_times("1 head (gem)", timings["1 head"], len(records))
        print_ratio("4-head / 1-head wall time", timings["4 heads"], timings["1 head"], "<= 1.3")
        print(f"  {'gem descriptors equal':<28} {same}   heads of the 4-head run: {sorted(results['4'].descriptors)}")


class Cli:
    """`evaluate(cfg)` in process, composed as the command line would be; its console output swallowed."""

    def __init__(self, work: Path, data: Path, max_size: int | None) -> None:
        self.work, self.data, self.max_size, self.count = work, data, max_size, 0

    def __call__(self, *overrides: str, cache_dir: Path | None = None) -> tuple[dict, float]:
        from hydra import compose

        from hetretrieval.cli.evaluate import evaluate

        self.count += 1
        output_dir = self.work / f"run{self.count:03d}"
        extra = [] if self.max_size is None else [f"extraction.max_size={self.max_size}"]
        cfg = compose("eval", overrides=[
            "dataset=heritage_wild", f"paths.data_dir={self.data}", f"paths.output_dir={output_dir}",
            f"paths.cache_dir={cache_dir or self.work / 'unused-cache'}", "logger=csv",
            "evaluation.report=false", *extra, *overrides])
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            summary = evaluate(cfg)
        wall = time.perf_counter() - started
        first = summary if "timings" in summary else next(iter(summary.values()))
        return first, wall


def cache_section(cli: Cli, work: Path, repeats: int) -> None:
    print(f"\n(b) descriptor cache: evaluate(cfg) pooling=gem cache=true, a miss (new empty cache dir) then a hit "
          f"(same dir), {repeats} interleaved rounds")
    extraction = {"miss": [], "hit": []}
    wall = {"miss": [], "hit": []}
    for round_ in range(repeats):
        cache_dir = work / f"cache{round_}"
        for status in ("miss", "hit"):
            summary, seconds = cli("pooling=gem", "cache=true", cache_dir=cache_dir)
            if summary["descriptor_cache"] != status:
                raise SystemExit(f"expected a cache {status}, the summary says {summary['descriptor_cache']}")
            extraction[status].append(summary["timings"]["extraction_s"])
            wall[status].append(seconds)
    print_times("miss: timings.extraction_s", extraction["miss"], width=30)
    print_times("hit:  timings.extraction_s", extraction["hit"], width=30)
    print_ratio("hit/miss extraction_s", extraction["hit"], extraction["miss"], "<= 0.05", width=30)
    print_times("miss: run wall time", wall["miss"], width=30)
    print_times("hit:  run wall time", wall["hit"], width=30)
    print_ratio("hit/miss run wall time", wall["hit"], wall["miss"], width=30)


def cli_section(cli: Cli, repeats: int) -> None:
    print(f"\n(c) CLI: one run heads=[{','.join(HEADS)}] vs 4 runs pooling=<head>, cache=false, "
          f"{repeats} interleaved rounds")
    extraction = {"4-head": [], "singles": []}

    def four_heads() -> None:
        summary, _ = cli(f"heads=[{','.join(HEADS)}]", "cache=false")
        extraction["4-head"].append(summary["timings"]["extraction_s"])

    def singles() -> None:
        extraction["singles"].append(sum(cli(f"pooling={head}", "cache=false")[0]["timings"]["extraction_s"]
                                         for head in HEADS))

    timings = interleave({"4-head": four_heads, "singles": singles}, repeats, warmup=0)
    print_times("1 run, 4 heads: wall", timings["4-head"], width=30)
    print_times("4 runs, 1 head each: wall", timings["singles"], width=30)
    print_ratio("4-head run / 4 single runs", timings["4-head"], timings["singles"], width=30)
    print_times("1 run, 4 heads: extraction_s", extraction["4-head"], width=30)
    print_times("4 runs: sum of extraction_s", extraction["singles"], width=30)
    print_ratio("extraction_s ratio", extraction["4-head"], extraction["singles"], width=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0", help="for (a); the CLI uses its config's")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of (a) and (b)")
    parser.add_argument("--cli-repeats", type=int, default=2, help="interleaved rounds of (c)")
    parser.add_argument("--per-class", type=int, default=5, help="pacs-dev images per domain x class in (a)")
    parser.add_argument("--cli-max-size", type=int, default=None, help="extraction.max_size of the CLI runs")
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding pacs-dev and heritage-wild")
    parser.add_argument("--only", nargs="+", choices=["heads", "cache", "cli"], default=["heads", "cache", "cli"])
    parser.add_argument("--quick", action="store_true",
                        help="2 rounds of (a) and (b), 1 of (c), 2 pacs images per class, CLI at max_size 512")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.cli_repeats, args.per_class = 2, 1, 2
        args.cli_max_size = args.cli_max_size or 512
    torch.set_num_threads(args.threads)
    print(f"{args.threads} torch thread(s), device cpu; times are wall seconds")

    if "heads" in args.only:
        heads_section(Backbone(args.backbone), args.data, args.per_class, args.repeats)
    if not {"cache", "cli"} & set(args.only):
        return
    import pytorch_lightning  # noqa: F401  (sets its loggers' levels on import: quiet them after)
    from hydra import initialize_config_dir

    import hetretrieval.config

    warnings.filterwarnings("ignore")  # Lightning's notes on every run (custom batch sampler, predict -> None)
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric", "hetretrieval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="hetretrieval-bench-") as tmp, \
            initialize_config_dir(str(hetretrieval.config.CONFIG_DIR), version_base="1.3"):
        work = Path(tmp)
        cli = Cli(work, args.data, args.cli_max_size)
        shown = "800 (config default)" if args.cli_max_size is None else args.cli_max_size
        print(f"\nCLI runs: dataset=heritage_wild, extraction.max_size {shown}, batch_size 4; "
              "warm-up: one untimed 4-head run")
        cli(f"heads=[{','.join(HEADS)}]", "cache=false")
        if "cache" in args.only:
            cache_section(cli, work, args.repeats)
        if "cli" in args.only:
            cli_section(cli, args.cli_repeats)
    if torch.get_num_threads() != args.threads:
        print(f"note: torch threads changed to {torch.get_num_threads()} during the runs")


if __name__ == "__main__":
    main()
