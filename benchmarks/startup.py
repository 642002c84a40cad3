"""Start-up time of the entry points, in fresh processes, against the floor of `python -c "import torch"`.

(a) help    `<entry point> --help` of every console script (hetretrieval-eval, -train, -train-attention,
            -analyze, -index, -search): wall seconds; target <= 3 s (issue 15).
(b) floor   `python -c "import torch"`, which any run pays (and `--help` need not).
(c) run     `hetretrieval-eval dataset=heritage_wild cache=false logger=csv` from process start to the first
            image file opened (`PIL.Image.open`, the header scan of `ImagePlan.scan`): the child exits there.
            That is every import of the run, the config composition, the output folder, building the
            backbone (offline packaged weights) and the heads; target for the import overhead <= 4 s (issue 15).

Every side runs `--repeats` times, interleaved (help of each entry point, torch, run, help, ...), after one
untimed warm-up round; min and median wall seconds of each, and each side's ratio to the torch floor (of mins
and of medians). (c) reads ../shared/data/heritage-wild (`--data`) and is skipped, said so, when it is absent.

    .venv/bin/python benchmarks/startup.py [--repeats 5] [--data ../shared/data]

Measured on the 2-core machine shared with other jobs (min / median seconds; ratio to `import torch` of mins /
of medians). Before (load 4, 3 rounds; `import torch` 2.9 / 3.0 s): eval --help 1.19 / 1.46, train --help
11.1 / 11.7 (3.84 / 3.87), train-attention 11.1 / 11.6 (3.85 / 3.81), analyze 2.52 / 2.62 (0.87 / 0.86), index 1.23
/ 1.33, search 1.30 / 1.80; eval to first image 9.4 / 12.4 (3.26 / 4.09: Lightning, pytorch-metric-learning,
scipy.stats loaded on the way). After (load 10, 5 rounds; `import torch` 5.7 / 6.9 s): every --help 1.4-2.9 /
2.6-3.2 (0.25-0.51 / 0.38-0.46); eval to first image 10.8 / 14.8 (1.89 / 2.15: torch, timm, which loads torchvision,
torch._dynamo and wandb, hydra, the backbone's weights).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from _interleave import interleave, print_ratio, print_times

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("hetretrieval-eval", "hetretrieval-train", "hetretrieval-train-attention", "hetretrieval-analyze",
           "hetretrieval-index", "hetretrieval-search")
# the run, stopped at its first image: PIL.Image.open is where every image file of the package is first read
FIRST_IMAGE = """\
import os, sys
import PIL.Image

def first_image(*args, **kwargs):
    print("first image", flush=True)
    os._exit(0)

PIL.Image.open = first_image
sys.argv = ["hetretrieval-eval", *sys.argv[1:]]
from hetretrieval.cli.evaluate import main
main()
raise SystemExit("the run ended without opening an image")
"""


def command(argv: list[str]) -> Callable[[], None]:
    """A side: run `argv` to completion, output swallowed; a failure stops the benchmark with its stderr."""
    def run() -> None:
        done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv[:3])} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    bin_dir = Path(sys.executable).parent
    sides = {name.removeprefix("hetretrieval-") + " --help": command([str(bin_dir / name), "--help"])
             for name in SCRIPTS}
    sides["import torch"] = command([sys.executable, "-c", "import torch"])
    with tempfile.TemporaryDirectory() as scratch:
        if (args.data / "heritage-wild" / "labels.csv").is_file():
            sides["eval to first image"] = command([
                sys.executable, "-c", FIRST_IMAGE, "dataset=heritage_wild", "cache=false", "logger=csv",
                f"paths.data_dir={args.data.resolve()}", f"paths.log_dir={scratch}/logs",
                f"paths.cache_dir={scratch}/cache"])
        else:
            print(f"skipping (c): no {args.data / 'heritage-wild' / 'labels.csv'} (--data)")
        print(f"{len(sides)} sides, {args.repeats} interleaved rounds after 1 warm-up, fresh processes")
        timings = interleave(sides, args.repeats)
    print("wall seconds (targets: each --help <= 3 s, eval to first image <= 4 s):")
    for name, seconds in timings.items():
        print_times(name, seconds)
    print("ratio to `import torch`:")
    for name, seconds in timings.items():
        if name != "import torch":
            print_ratio(name, seconds, timings["import torch"])


if __name__ == "__main__":
    main()
