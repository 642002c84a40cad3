"""Several saved runs side by side (the paper's Table 3), their correlation with class annotations (Table 1).

Everything here reads run directories written by the evaluation (`analysis/results.py`): a sweep is compared
and correlated without re-extracting a single image.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hetretrieval.analysis.annotations import (
    OVERALL_DIFFICULTY,
    VariationPredominance,
    alegoria_variation_predominance,
    load_variation_predominance,
    predominance_from_tags,
)
from hetretrieval.analysis.correlation import (
    Correlation,
    Table,
    correlate,
    correlation_matrix,
    plot_correlation_heatmap,
    plot_table_heatmap,
    write_correlations_csv,
)
from hetretrieval.analysis.results import SUMMARY, SUPERSEDED, SavedRun, load_images, load_run
from hetretrieval.analysis.tables import format_markdown_table
from hetretrieval.errors import ConfigError, DataError
from hetretrieval.loggers import override_labels

log = logging.getLogger(__name__)

AVERAGE = "Avg"
HIGHLIGHTED = 3  # the paper bolds the best three descriptors of each class


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories named by `paths`: each a run itself, or a (multi)run folder searched recursively
    (earlier results a re-run moved to `superseded-*/` are not runs of the sweep)."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if (path / SUMMARY).is_file():
            runs.append(path)
        elif path.is_dir():
            runs.extend(sorted(p.parent for p in path.rglob(SUMMARY)
                               if not any(part.startswith(SUPERSEDED) for part in p.relative_to(path).parts)))
        else:
            raise DataError(f"'{path}' does not exist")
    if not runs:
        raise DataError(f"no run directories (with {SUMMARY}) under {', '.join(map(str, paths))}")
    return list(dict.fromkeys(runs))


def run_labels(runs: Sequence[SavedRun]) -> list[str]:
    """A column name per run: its saved command-line overrides that differ between the runs (`max_size=128`;
    a single run: its own overrides). Where those leave runs alike (the heads of one run, runs without
    overrides), the descriptor, qualified by backbone and dataset where those vary; `#n` numbers runs that
    nothing tells apart."""
    labels = override_labels([r.summary.get("overrides") or [] for r in runs])
    if all(labels) and len(set(labels)) == len(labels):
        return labels
    keys = [(r.summary.get("backbone", "?"), r.summary.get("dataset", "?"), r.descriptor) for r in runs]
    varying = [len({key[i] for key in keys}) > 1 for i in range(2)]
    labels = ["/".join([*([label] if label else []), *(part for part, vary in zip(key[:2], varying, strict=True)
                                                        if vary), key[2]]) for label, key in zip(labels, keys, strict=True)]
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if labels.count(label) == 1 else f"{label}#{seen[label]}")
    return unique


def _class_order(names: set[str]) -> tuple[str, ...]:
    return tuple(sorted(names, key=lambda n: (0, int(n), "") if n.isdigit() else (1, 0, n)))


def per_class_map(runs: Sequence[SavedRun], labels: Sequence[str]) -> Table:
    """Classes × runs per-class mAP (NaN where a run has no evaluated query of the class)."""
    classes = _class_order({row["class"] for run in runs for row in run.per_class})
    values = np.full((len(classes), len(runs)), np.nan)
    for column, run in enumerate(runs):
        for row in run.per_class:
            if row["mAP"] not in ("", None):
                values[classes.index(row["class"]), column] = float(row["mAP"])
    return Table("class", classes, tuple(labels), values)


def best_mask(values: np.ndarray, n_best: int = HIGHLIGHTED) -> np.ndarray:
    """`(C, D)` -> `(C, D)` bool: each row's `n_best` highest finite values, ties with the last one included."""
    mask = np.zeros(values.shape, dtype=bool)
    for row, line in enumerate(values):
        finite = np.sort(line[np.isfinite(line)])[::-1]
        if finite.size:
            mask[row] = np.isfinite(line) & (line >= finite[min(n_best, finite.size) - 1])
    return mask


@dataclass(frozen=True)
class Comparison:
    """Several runs compared: their summaries, per-class mAP and, with annotations, the correlations."""

    labels: tuple[str, ...]
    runs: tuple[SavedRun, ...]
    per_class: Table
    predominance: VariationPredominance | None
    correlations: tuple[Correlation, ...]
    notes: tuple[str, ...] = ()  # what the reader should know (runs of different datasets)

    def summary_rows(self) -> list[dict]:
        """One row per run: label, backbone, dataset, mAP, class mAP, mP@k, throughput."""
        keys = [k for k in self.runs[0].summary if k.startswith("mP@")]
        return [{"descriptor": label, "backbone": run.summary.get("backbone"), "dataset": run.summary.get("dataset"),
                 "mAP": run.summary.get("mAP"), "class_mAP": run.summary.get("class_mAP"),
                 **{k: run.summary.get(k) for k in keys},
                 "images/s": run.summary.get("timings", {}).get("images_per_s")}
                for label, run in zip(self.labels, self.runs, strict=True)]

    def class_rows(self) -> list[dict]:
        """Table 3: one row per class, each run's mAP, their average and (annotated) the overall difficulty."""
        difficulty = {}
        if self.predominance is not None:
            overall = self.predominance.with_overall_difficulty()
            difficulty = dict(zip(overall.index, overall.column(OVERALL_DIFFICULTY), strict=True))
        n_queries = {row["class"]: int(row["n_queries"]) for run in self.runs for row in run.per_class}
        rows = []
        for label, line in zip(self.per_class.index, self.per_class.values, strict=True):
            finite = line[np.isfinite(line)]
            rows.append({"class": label, "n_queries": n_queries.get(label),
                         **{c: (float(v) if np.isfinite(v) else None) for c, v in zip(self.labels, line, strict=True)},
                         AVERAGE: float(finite.mean()) if finite.size else None,
                         OVERALL_DIFFICULTY: (int(difficulty[label]) if label in difficulty else None)})
        return rows

    def correlation_table(self, statistic: str = "pearson_r") -> Table | None:
        return correlation_matrix(self.correlations, statistic) if self.correlations else None

    def markdown(self) -> str:
        """The report: run summaries, the per-class table (best three of each class in bold), correlations."""
        rows = self.class_rows()
        bold = best_mask(self.per_class.values)
        for row, mask in zip(rows, bold, strict=True):
            for label, is_best in zip(self.labels, mask, strict=True):
                if is_best:
                    row[label] = f"**{row[label]:.3f}**"
        summary_columns = list(self.summary_rows()[0])
        class_columns = ["class", "n_queries", *self.labels, AVERAGE]
        if self.predominance is not None:
            class_columns.append(OVERALL_DIFFICULTY)
        parts = ["## Runs", "", format_markdown_table(self.summary_rows(), summary_columns, "{:.4f}"), "",
                 *(f"Note: {note}\n" for note in self.notes),
                 f"## Per-class mAP (best {HIGHLIGHTED} of each class in bold)", "",
                 format_markdown_table(rows, class_columns)]
        table = self.correlation_table()
        if table is not None:
            n = self.correlations[0].n
            parts += ["", f"## Pearson correlation of per-class mAP with variation predominance (n = {n} classes)",
                      "", format_markdown_table(
                          [{"variation": v, **dict(zip(table.columns, map(float, line), strict=True))}
                           for v, line in zip(table.index, table.values, strict=True)],
                          ["variation", *table.columns], "{:+.2f}")]
            if n < 10:
                parts += ["", f"Warning: only {n} classes; these correlations are unreliable (see the p-values and "
                          "bootstrap intervals in correlations.csv)."]
        return "\n".join(parts) + "\n"

    def write(self, output_dir: str | Path) -> dict[str, Path]:
        """Write comparison.md, comparison.csv (Table 3: per-class mAP of every run), per_class_map.png and,
        annotated, correlations.csv, correlation_pearson.csv and correlation_heatmap.png; returns the paths."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        paths = {"markdown": output_dir / "comparison.md", "per_class_csv": output_dir / "comparison.csv"}
        paths["markdown"].write_text(self.markdown(), encoding="utf-8")
        rows = self.class_rows()
        columns = list(rows[0])
        with_average = Table("class", self.per_class.index, (*self.labels, AVERAGE),
                             [[np.nan if row[c] is None else row[c] for c in (*self.labels, AVERAGE)] for row in rows])
        with paths["per_class_csv"].open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        paths["per_class_heatmap"] = plot_table_heatmap(with_average, output_dir / "per_class_map.png",
                                                        "per-class mAP")
        table = self.correlation_table()
        if table is not None:
            paths["correlations_csv"] = write_correlations_csv(self.correlations, output_dir / "correlations.csv")
            paths["correlation_csv"] = table.write_csv(output_dir / "correlation_pearson.csv")
            paths["correlation_heatmap"] = plot_correlation_heatmap(
                table, output_dir / "correlation_heatmap.png",
                f"Pearson r, per-class mAP vs predominance (n={self.correlations[0].n})")
        return paths


def resolve_annotations(source: str | Path | None, run: SavedRun | None) -> VariationPredominance | None:
    """Class annotations for a run: a predominance CSV path, `alegoria` (shipped), `tags` (derived from the
    image tags of its images.csv), `auto` (alegoria for an Alegoria run, else tags when images carry any), or None.
    """
    if source is None or source == "none":
        return None
    if source in ("auto", "tags") and run is None:
        raise ConfigError(f"annotations={source} needs a saved run to read image tags from")
    if source == "auto":
        if str(run.summary.get("dataset", "")).startswith("alegoria"):
            return alegoria_variation_predominance()
        return tag_predominance(run.directory, required=False)
    if source == "alegoria":
        return alegoria_variation_predominance()
    if source == "tags":
        return tag_predominance(run.directory, required=True)
    return load_variation_predominance(source)


def tag_predominance(directory: str | Path, required: bool = True) -> VariationPredominance | None:
    """`predominance_from_tags` over a run's labelled images and every tag that varies among them."""
    images = load_images(directory)
    labelled = [r for r in images.records if r.label is not None]
    shared = set.intersection(*(set(r.metadata) for r in labelled)) if labelled else set()
    columns = sorted(c for c in shared if len({r.metadata[c] for r in labelled}) > 1)
    if not columns:
        if required:
            raise DataError(f"the images of '{directory}' carry no tag that varies across labelled images")
        return None
    return predominance_from_tags([r.label for r in labelled], {c: [r.metadata[c] for r in labelled] for c in columns})


def compare_runs(paths: Sequence[str | Path], annotations: str | Path | None = "auto",
                 n_resamples: int = 10_000, seed: int = 0) -> Comparison:
    """Load the runs under `paths`, tabulate their per-class mAP and correlate it with the class annotations."""
    runs = tuple(_readable_runs(find_runs(paths)))
    labels = tuple(run_labels(runs))
    per_class = per_class_map(runs, labels)
    predominance = resolve_annotations(annotations, runs[0])
    finite_classes = [c for c, line in zip(per_class.index, per_class.values, strict=True) if np.isfinite(line).all()]
    datasets = list(dict.fromkeys(str(run.summary.get("dataset", "?")) for run in runs))
    notes: list[str] = []
    if len(datasets) > 1:
        notes.append(f"the runs are of {len(datasets)} different datasets ({', '.join(datasets)}): each column "
                     f"holds its own run's classes, {len(finite_classes)} of {len(per_class.index)} are in every run")
    correlations: tuple[Correlation, ...] = ()
    if predominance is not None:
        scores = predominance.with_overall_difficulty()
        try:
            correlations = tuple(correlate(scores, per_class.select(index=finite_classes), n_resamples, seed=seed))
        except DataError as error:  # `auto` correlates where the runs allow it (a debug run may hold one class)
            if len(datasets) > 1:
                notes.append(f"no correlation with the class annotations (those of {datasets[0]}): {error}")
            elif annotations != "auto":
                raise
            log.info("no correlation with the class annotations: %s", error)
    return Comparison(labels, runs, per_class, predominance, correlations, tuple(notes))


def _readable_runs(directories: Sequence[Path]) -> list[SavedRun]:
    """Every run that reads back; a broken one (cut short by a kill or a full disk) is named and skipped."""
    runs = []
    for directory in directories:
        try:
            runs.append(load_run(directory))
        except DataError as error:
            log.warning("skipping %s", error)
    if not runs:
        raise DataError(f"none of the {len(directories)} run directories could be read")
    return runs
