"""Figure 4-style qualitative grids: a query and its top-k results, green border if relevant, red if not.

Drawn from a saved run (per_query_ap.csv, neighbours.npy, images.csv), for the classes where a descriptor
does best and worst, so the failure modes behind a low class mAP can be seen.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hetretrieval.analysis.figures import save_figure
from hetretrieval.analysis.results import NEIGHBOURS, load_images, load_run
from hetretrieval.data.images import ImageLoadError, load_image
from hetretrieval.errors import ConfigError

log = logging.getLogger(__name__)

RELEVANT_COLOUR = (0.1, 0.7, 0.1)
IRRELEVANT_COLOUR = (0.85, 0.1, 0.1)
UNJUDGED_COLOUR = (0.6, 0.6, 0.6)  # no ground truth (a search of an unlabelled collection)


@dataclass(frozen=True)
class GridRow:
    """One row of the grid: the query image, its class and AP, its top-k results and their relevance.

    Unlabelled searches (`hetretrieval-search`) leave `average_precision` and `relevant` None (grey borders)
    and caption each result with `captions` (rank and score) instead of its rank.
    """

    query_path: Path
    label: str
    average_precision: float | None
    result_paths: tuple[Path, ...]
    relevant: tuple[bool | None, ...]
    captions: tuple[str, ...] | None = None


def extreme_classes(per_class: Sequence[dict], n_classes: int) -> tuple[list[str], list[str]]:
    """The `n_classes` best and worst classes by mAP, ties by class name (classes without a query skipped)."""
    scored = [(float(r["mAP"]), r["class"]) for r in per_class if r["mAP"] not in ("", None)]
    best = [c for _, c in sorted(scored, key=lambda s: (-s[0], s[1]))[:n_classes]]
    worst = [c for _, c in sorted(scored)[:n_classes]]
    return best, worst


def grid_rows(directory: str | Path, classes: Sequence[str], top_k: int = 5) -> list[GridRow]:
    """For each class, its median-AP query (a typical case, not a lucky one) and that query's top-k results."""
    directory = Path(directory)
    run = load_run(directory)
    images = load_images(directory)
    neighbours = np.load(directory / NEIGHBOURS)
    if top_k < 1 or top_k > neighbours.shape[1]:
        raise ConfigError(f"top_k must be in [1, {neighbours.shape[1]}] (the neighbours saved), got {top_k}")
    rows = []
    for label in classes:
        members = [(float(q["ap"]), row) for row, q in enumerate(run.per_query) if q["label"] == label and q["ap"]]
        if not members:
            continue
        members.sort()
        ap, row = members[len(members) // 2]
        ranked = neighbours[row, :top_k]
        rows.append(GridRow(Path(run.per_query[row]["path"]), label, ap,
                            tuple(images.records[i].path for i in ranked),
                            tuple(images.records[i].label == label for i in ranked)))
    return rows


def draw_grid(rows: Sequence[GridRow], path: str | Path, title: str | None = None, thumbnail: int = 160) -> Path:
    """Save the grid as a PNG: one line per row, the query (blue border) then its results.

    An image that cannot be read is drawn as 'unreadable', and one warning says how many and names the first,
    so that a run whose paths no longer lead to its images (moved, or relative to another directory) does not
    silently give a grid of blanks.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        raise ConfigError("no grid rows to draw (no class with an evaluated query)")
    n_columns = 1 + max(len(r.result_paths) for r in rows)
    figure = Figure(figsize=(1.6 * n_columns, 1.8 * len(rows)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), n_columns, squeeze=False)
    unreadable = []
    for line, row in zip(axes, rows, strict=True):
        ap = "" if row.average_precision is None else f"\nAP {row.average_precision:.2f}"
        cells = [(row.query_path, (0.1, 0.3, 0.9), f"{row.label}{ap}")]
        captions = row.captions or tuple(f"#{rank}" for rank in range(1, len(row.result_paths) + 1))
        cells += [(p, UNJUDGED_COLOUR if ok is None else RELEVANT_COLOUR if ok else IRRELEVANT_COLOUR, caption)
                  for p, ok, caption in zip(row.result_paths, row.relevant, captions, strict=True)]
        for ax, (image_path, colour, caption) in zip(line, cells, strict=False):
            error = _show(ax, image_path, thumbnail)
            if error is not None:
                unreadable.append(error)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4)
            ax.set_title(caption, fontsize=7)
        for ax in line[len(cells):]:
            ax.axis("off")
    if unreadable:
        log.warning("%s: %d of the %d grid images could not be read, drawn as 'unreadable' (first: %s)",
                    path, len(unreadable), sum(1 + len(r.result_paths) for r in rows), unreadable[0])
    if title:
        figure.suptitle(title)
    return save_figure(figure, path, dpi=110)


def _show(ax, image_path: Path, thumbnail: int) -> ImageLoadError | None:
    """Draw one thumbnail; returns why, if the image could not be read."""
    error = None
    try:
        ax.imshow(load_image(image_path, thumbnail).permute(1, 2, 0).numpy())
    except ImageLoadError as unreadable:
        ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=7)
        error = unreadable
    ax.set_xticks([])
    ax.set_yticks([])
    return error


def best_and_worst_grids(directory: str | Path, output_dir: str | Path, n_classes: int = 3,
                         top_k: int = 5) -> dict[str, Path]:
    """Write `figure4_best.png` and `figure4_worst.png` for a saved run; returns their paths."""
    run = load_run(directory)
    best, worst = extreme_classes(run.per_class, n_classes)
    output_dir = Path(output_dir)
    return {kind: draw_grid(grid_rows(directory, classes, top_k), output_dir / f"figure4_{kind}.png",
                            f"{run.descriptor} on {run.summary.get('dataset')}: {kind} classes")
            for kind, classes in (("best", best), ("worst", worst))}
