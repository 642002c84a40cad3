"""Interleaved timing for the benchmarks: on a shared, noisy machine only ratios measured in one run mean much.

`interleave({"A": fa, "B": fb, ...}, repeats)` runs A, B, ..., A, B, ... `repeats` times (after `warmup` untimed
rounds in the same order) and returns every timing; `compare` prints min and median of two of them and their
ratios (of mins and of medians), so that each figure is a ratio of two things timed side by side.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping


def interleave(runs: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall seconds of each run, `repeats` times each, in round-robin order; warm-up rounds are not kept."""
    timings: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(warmup + repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            elapsed = time.perf_counter() - started
            if round_ >= warmup:
                timings[name].append(elapsed)
    return timings


def summary(seconds: list[float], count: int | None = None, unit: str = "images/s") -> str:
    """`min / median` of the timings, and of the rate when `count` items were processed per run."""
    low, mid = min(seconds), statistics.median(seconds)
    text = f"min {low:8.3f} s  median {mid:8.3f} s"
    if count is not None:
        text += f"   ({count / low:7.1f} / {count / mid:7.1f} {unit} at min / median)"
    return text


def ratio(numerator: list[float], denominator: list[float]) -> tuple[float, float]:
    """(ratio of mins, ratio of medians) of two timing lists."""
    return (min(numerator) / min(denominator),
            statistics.median(numerator) / statistics.median(denominator))


def print_times(label: str, seconds: list[float], count: int | None = None, width: int = 28) -> None:
    print(f"  {label:<{width}} {summary(seconds, count)}   n={len(seconds)}")


def print_ratio(label: str, numerator: list[float], denominator: list[float], target: str = "",
                invert: bool = False, width: int = 28) -> tuple[float, float]:
    """Print `numerator / denominator` of times, or of rates (`invert`: denominator / numerator of times)."""
    of_mins, of_medians = ratio(denominator, numerator) if invert else ratio(numerator, denominator)
    suffix = f"   target {target}" if target else ""
    print(f"  {label:<{width}} {of_mins:6.3f} (mins)  {of_medians:6.3f} (medians){suffix}")
    return of_mins, of_medians
