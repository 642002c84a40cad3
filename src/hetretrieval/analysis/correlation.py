"""Correlation over classes between retrieval performance and variation predominance (the paper's Table 1).

Each descriptor's per-class mAP is correlated with each variation's per-class predominance score (and the
overall difficulty), every class being one observation: Pearson r with its two-sided p-value and a percentile
bootstrap confidence interval over classes, and Spearman rho with its p-value.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TextIO

import numpy as np

from hetretrieval.analysis.figures import save_figure
from hetretrieval.errors import ConfigError, DataError

SMALL_SAMPLE = 10


class CorrelationWarning(UserWarning):
    """A correlation is unreliable (few classes) or undefined (a constant column)."""


@dataclass(frozen=True)
class Table:
    """Named rows × named columns of numbers: e.g. classes × descriptors (per-class mAP) or × variations.

    `values`: `(len(index), len(columns))` float64, read-only. `index_name` heads the row labels in CSV files.
    """

    index_name: str
    index: tuple[str, ...]
    columns: tuple[str, ...]
    values: np.ndarray

    def __post_init__(self) -> None:
        values = np.array(self.values, dtype=np.float64)
        if values.shape != (len(self.index), len(self.columns)):
            raise ConfigError(f"table values {values.shape} do not match {len(self.index)} rows "
                              f"× {len(self.columns)} columns")
        for kind, labels in (("row", self.index), ("column", self.columns)):
            if len(set(labels)) != len(labels):
                raise ConfigError(f"duplicate {kind} labels in table: {sorted(labels)}")
        values.setflags(write=False)
        object.__setattr__(self, "index", tuple(self.index))
        object.__setattr__(self, "columns", tuple(self.columns))
        object.__setattr__(self, "values", values)

    def column(self, name: str) -> np.ndarray:
        """`(len(index),)` values of one column."""
        if name not in self.columns:
            raise ConfigError(f"no column '{name}' in table (columns: {', '.join(self.columns)})")
        return self.values[:, self.columns.index(name)]

    def select(self, index: Sequence[str] | None = None, columns: Sequence[str] | None = None) -> Table:
        """The sub-table of the given row labels and/or columns, in the given order."""
        index = tuple(self.index if index is None else index)
        columns = tuple(self.columns if columns is None else columns)
        missing = [label for label in index if label not in self.index]
        missing += [name for name in columns if name not in self.columns]
        if missing:
            raise ConfigError(f"labels not in table: {', '.join(missing)}")
        rows = [self.index.index(label) for label in index]
        cols = [self.columns.index(name) for name in columns]
        return Table(self.index_name, index, columns, self.values[np.ix_(rows, cols)])

    @classmethod
    def read_csv(cls, source: str | os.PathLike | Traversable) -> Table:
        """Read a CSV whose first column holds row labels and whose other columns hold numbers."""
        with open_text_source(source) as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if not header or len(header) < 2:
                raise DataError(f"{source}: expected a header with a label column and value columns")
            index, rows = [], []
            for line, row in enumerate(reader, start=2):
                if len(row) != len(header):
                    raise DataError(f"{source} line {line}: {len(row)} fields, expected {len(header)}: {row}")
                try:
                    rows.append([float(v) for v in row[1:]])
                except ValueError as exc:
                    raise DataError(f"{source} line {line}: non-numeric value in {row}") from exc
                index.append(row[0])
        if len(set(index)) != len(index):
            raise DataError(f"{source}: duplicate row labels in column '{header[0]}'")
        values = np.array(rows, dtype=np.float64).reshape(len(rows), len(header) - 1)
        return cls(header[0], tuple(index), tuple(header[1:]), values)

    def write_csv(self, path: str | os.PathLike, decimals: int = 6) -> Path:
        """Write the table as CSV (values rounded to `decimals`); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow((self.index_name, *self.columns))
            for label, row in zip(self.index, self.values, strict=True):
                writer.writerow((label, *(_format(v, decimals) for v in row)))
        return path


@dataclass(frozen=True)
class Correlation:
    """One (variation, descriptor) pair, over `n` classes; NaN where undefined (a constant column)."""

    variation: str
    descriptor: str
    n: int
    pearson_r: float
    pearson_p: float
    pearson_ci_low: float
    pearson_ci_high: float
    spearman_rho: float
    spearman_p: float


def pearson_matrix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r between every column of `x` and of `y` over the sample axis.

    `x (..., n, V)`, `y (..., n, D)` -> `(..., V, D)`; NaN where a column is constant.
    """
    xc = x - x.mean(axis=-2, keepdims=True)
    yc = y - y.mean(axis=-2, keepdims=True)
    covariance = np.einsum("...nv,...nd->...vd", xc, yc)
    norms = np.linalg.norm(xc, axis=-2)[..., :, None] * np.linalg.norm(yc, axis=-2)[..., None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, covariance / norms, np.nan)


def bootstrap_pearson_ci(
    x: np.ndarray, y: np.ndarray, n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of Pearson r, resampling classes (rows) with replacement.

    `x (n, V)`, `y (n, D)` -> `(low, high)`, each `(V, D)`. Resamples where a column comes out constant are
    left out of the percentiles; NaN where none is left.
    """
    if n_resamples < 1 or not 0 < confidence < 1:
        raise ConfigError(f"bootstrap needs n_resamples >= 1 and 0 < confidence < 1, "
                          f"got {n_resamples} and {confidence}")
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(x), size=(n_resamples, len(x)))
    r = pearson_matrix(x[rows], y[rows])
    tail = (1 - confidence) / 2 * 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pairs stay NaN
        low, high = np.nanpercentile(r, [tail, 100 - tail], axis=0)
    return low, high


def correlate(
    predominance: Table,
    performance: Table,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[Correlation]:
    """Correlate every variation column of `predominance` with every descriptor column of `performance`.

    Both tables have classes as rows and are aligned on the classes they share (in `predominance`'s order).
    Warns (`CorrelationWarning`) when fewer than `SMALL_SAMPLE` classes are shared or a column is constant.
    """
    shared = [c for c in predominance.index if c in set(performance.index)]
    if len(shared) < 3:
        raise DataError(f"correlation needs at least 3 shared classes, got {len(shared)}")
    dropped = sorted(set(predominance.index) ^ set(performance.index))
    if dropped:
        warnings.warn(f"classes not in both tables are left out: {', '.join(dropped)}", CorrelationWarning,
                      stacklevel=2)
    x = predominance.select(index=shared).values
    y = performance.select(index=shared).values
    n = len(shared)
    if n < SMALL_SAMPLE:
        warnings.warn(f"only {n} classes: correlations and their p-values are unreliable", CorrelationWarning,
                      stacklevel=2)
    constant_x, constant_y = np.ptp(x, axis=0) == 0, np.ptp(y, axis=0) == 0
    if constant_x.any() or constant_y.any():
        names = [*np.array(predominance.columns)[constant_x], *np.array(performance.columns)[constant_y]]
        warnings.warn(f"constant columns have undefined correlations (NaN): {', '.join(names)}",
                      CorrelationWarning, stacklevel=2)
    # scipy.stats costs 1.3 s of import: loaded when correlating, not by every run that imports this module
    from scipy import stats

    ci_low, ci_high = bootstrap_pearson_ci(x, y, n_resamples, confidence, seed)
    results = []
    for v, variation in enumerate(predominance.columns):
        for d, descriptor in enumerate(performance.columns):
            if constant_x[v] or constant_y[d]:
                pearson = spearman = (math.nan, math.nan)
            else:
                pearson = stats.pearsonr(x[:, v], y[:, d])
                spearman = stats.spearmanr(x[:, v], y[:, d])
            results.append(Correlation(
                variation=variation, descriptor=descriptor, n=n,
                pearson_r=float(pearson[0]), pearson_p=float(pearson[1]),
                pearson_ci_low=float(ci_low[v, d]), pearson_ci_high=float(ci_high[v, d]),
                spearman_rho=float(spearman[0]), spearman_p=float(spearman[1]),
            ))
    return results


def correlation_matrix(correlations: Sequence[Correlation], statistic: str = "pearson_r") -> Table:
    """Variations × descriptors table of one statistic (a `Correlation` field), in first-seen order."""
    if statistic not in {f.name for f in fields(Correlation)} - {"variation", "descriptor"}:
        raise ConfigError(f"unknown correlation statistic '{statistic}'")
    variations = tuple(dict.fromkeys(c.variation for c in correlations))
    descriptors = tuple(dict.fromkeys(c.descriptor for c in correlations))
    values = np.full((len(variations), len(descriptors)), np.nan)
    for c in correlations:
        values[variations.index(c.variation), descriptors.index(c.descriptor)] = getattr(c, statistic)
    return Table("variation", variations, descriptors, values)


def write_correlations_csv(correlations: Sequence[Correlation], path: str | os.PathLike, decimals: int = 6) -> Path:
    """Write the tidy table, one row per (variation, descriptor) pair; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(f.name for f in fields(Correlation))
        for c in correlations:
            writer.writerow(_format(v, decimals) if isinstance(v, float) else v for v in astuple(c))
    return path


def plot_correlation_heatmap(matrix: Table, path: str | os.PathLike, title: str | None = None) -> Path:
    """Save a PNG heatmap of a variations × descriptors matrix in [-1, 1], each cell annotated."""
    return plot_table_heatmap(matrix, path, title, value_range=(-1.0, 1.0), cmap="RdBu_r", label="correlation")


def plot_table_heatmap(
    table: Table, path: str | os.PathLike, title: str | None = None, value_range: tuple[float, float] = (0.0, 1.0),
    cmap: str = "viridis", label: str = "mAP",
) -> Path:
    """Save a PNG heatmap of any `Table` (e.g. classes × descriptors mAP), each cell annotated; NaN shown n/a.

    A `value_range` spanning 0 is read as diverging (e.g. correlations with "RdBu_r").
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_rows, n_cols = table.values.shape
    figure = Figure(layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    low, high = value_range
    diverging = low < 0 < high
    image = axes.imshow(table.values, cmap=cmap, vmin=low, vmax=high, aspect="auto")
    axes.set_xticks(range(n_cols), table.columns, rotation=45, ha="right")
    axes.set_yticks(range(n_rows), table.index)
    for (row, col), value in np.ndenumerate(table.values):
        text = "n/a" if np.isnan(value) else f"{value:.2f}"
        axes.text(col, row, text, ha="center", va="center", fontsize=8,
                  color="white" if _dark_cell(value, low, high, diverging) else "black")
    figure.colorbar(image, ax=axes, label=label)
    # a title centred on the figure, which is sized to hold it (centred over narrower axes, it could spill out)
    suptitle = figure.suptitle(title) if title else None
    figure.set_size_inches(_heatmap_size(figure, axes, suptitle, n_rows, n_cols))
    return save_figure(figure, path, dpi=150)


CELL_INCHES = (0.9, 0.45)  # width, height of one annotated cell
COLORBAR_INCHES = 1.3  # the colour bar with its ticks and label
PAD_INCHES = 0.3


def _heatmap_size(figure, axes, title, n_rows: int, n_cols: int) -> tuple[float, float]:
    """Figure inches that fit the cells and the measured labels and title, so that constrained layout cuts
    nothing off (long run names as columns, a title wider than the cells). Column labels, rotated, end at their
    tick: the first ones can reach further left than the row labels."""
    renderer = figure.canvas.get_renderer()

    def size(text) -> tuple[float, float]:
        """A text's drawn (width, height) in inches; (0, 0) for none."""
        if text is None or not text.get_text():
            return 0.0, 0.0
        box = text.get_window_extent(renderer)
        return box.width / figure.dpi, box.height / figure.dpi

    cell_width, cell_height = CELL_INCHES
    row_labels = max((size(text)[0] for text in axes.get_yticklabels()), default=0.0) + 0.1  # + tick marks
    columns = [size(text) for text in axes.get_xticklabels()]
    overhang = max((width - (col + 0.5) * cell_width for col, (width, _) in enumerate(columns)), default=0.0)
    title_width, title_height = size(title)
    width = max(max(row_labels, overhang) + n_cols * cell_width + COLORBAR_INCHES, title_width)
    height = n_rows * cell_height + max((h for _, h in columns), default=0.0) + title_height
    return width + 2 * PAD_INCHES, height + 2 * PAD_INCHES


def _dark_cell(value: float, low: float, high: float, diverging: bool) -> bool:
    """Whether a cell's colour is dark: the ends of a diverging map, the low end of a sequential one."""
    middle = (low + high) / 2
    return abs(value - middle) > 0.3 * (high - low) if diverging else value < middle


def open_text_source(source: str | os.PathLike | Traversable) -> TextIO:
    """Open a CSV given as a path or a package resource (`importlib.resources`) for reading."""
    if isinstance(source, str | os.PathLike):
        source = Path(source)
    if not source.is_file():
        raise DataError(f"file not found: {source}")
    return source.open("r", encoding="utf-8", newline="")


def _format(value: float, decimals: int) -> str:
    return "nan" if math.isnan(value) else repr(round(float(value), decimals))
