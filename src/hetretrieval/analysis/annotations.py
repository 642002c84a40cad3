"""Class-level variation predominance annotations (Gominski et al. 2019, section 2.2) and the paper's tables.

Each class gets, per variation type, a predominance score comparing its images to a reference image:
0 no image concerned, 1 anecdotal (one image or fewer), 2 multiple occurrences, 3 predominant (more than a
third of the class). Their sum is the class's overall difficulty. The Alegoria annotations and the paper's
results ship as package resources under `hetretrieval/resources/alegoria/`.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable

import numpy as np

from hetretrieval.analysis.correlation import Table, open_text_source
from hetretrieval.errors import DataError

PREDOMINANCE_LEVELS = (0, 1, 2, 3)
CLASS_SIZE_COLUMN = "n_images"
OVERALL_DIFFICULTY = "Overall"
ALEGORIA_VARIATIONS = ("Sc", "Il", "Or", "Co", "Do", "Oc", "Po", "Cl", "Un", "Al", "Ti")
PAPER_DESCRIPTORS = ("DELF", "ORB", "NetVLAD", "GeM", "MAC", "RMAC", "SPoC")


@dataclass(frozen=True)
class Variation:
    """One annotated variation type: short code (a table column), name and definition."""

    code: str
    name: str
    definition: str


@dataclass(frozen=True)
class VariationPredominance:
    """Classes × variations predominance scores (0–3) and, when annotated, each class's image count."""

    scores: Table
    class_sizes: np.ndarray | None  # (n_classes,) int64

    def with_overall_difficulty(self) -> Table:
        """The scores with an `Overall` column appended: the per-class sum over variations."""
        values = np.column_stack([self.scores.values, self.scores.values.sum(axis=1)])
        return Table(self.scores.index_name, self.scores.index, (*self.scores.columns, OVERALL_DIFFICULTY), values)


def load_variation_predominance(source: str | os.PathLike | Traversable) -> VariationPredominance:
    """Read a predominance CSV: a `class` column, optionally `n_images`, one integer 0–3 column per variation."""
    table = Table.read_csv(source)
    if table.index_name != "class":
        raise DataError(f"{source}: the first column must be 'class', got '{table.index_name}'")
    variations = tuple(c for c in table.columns if c != CLASS_SIZE_COLUMN)
    if not variations:
        raise DataError(f"{source}: no variation columns")
    scores = table.select(columns=variations)
    bad = ~np.isin(scores.values, PREDOMINANCE_LEVELS)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(f"{source} line {row + 2} (class {scores.index[row]}): {variations[col]} = "
                        f"{scores.values[row, col]:g} is not a predominance level {PREDOMINANCE_LEVELS}")
    class_sizes = None
    if CLASS_SIZE_COLUMN in table.columns:
        sizes = table.column(CLASS_SIZE_COLUMN)
        bad_sizes = (sizes < 1) | (sizes != np.round(sizes))
        if bad_sizes.any():
            row = int(np.argmax(bad_sizes))
            raise DataError(f"{source} line {row + 2} (class {table.index[row]}): "
                            f"{CLASS_SIZE_COLUMN} = {sizes[row]:g} is not a positive integer")
        class_sizes = sizes.astype(np.int64)
    return VariationPredominance(scores=scores, class_sizes=class_sizes)


def load_variations(source: str | os.PathLike | Traversable) -> tuple[Variation, ...]:
    """Read a `code,name,definition` CSV of variation types."""
    with open_text_source(source) as handle:
        rows = list(csv.DictReader(handle))
    if not rows or set(rows[0]) != {"code", "name", "definition"}:
        raise DataError(f"{source}: expected the columns code, name, definition")
    return tuple(Variation(row["code"], row["name"], row["definition"]) for row in rows)


def _alegoria_resource(name: str) -> Traversable:
    return files("hetretrieval").joinpath("resources", "alegoria", name)


def alegoria_variation_predominance() -> VariationPredominance:
    """The paper's annotation of the 39 Alegoria classes (Table 3, right part), with class sizes."""
    return load_variation_predominance(_alegoria_resource("variation_predominance.csv"))


def alegoria_variations() -> tuple[Variation, ...]:
    """The 11 annotated variation types, in the paper's column order."""
    return load_variations(_alegoria_resource("variations.csv"))


def paper_table3_map() -> Table:
    """The paper's per-class mAP of DELF, ORB, NetVLAD, GeM, MAC, RMAC and SPoC (Table 3, left part)."""
    return Table.read_csv(_alegoria_resource("paper_table3_map.csv"))


def paper_table1() -> Table:
    """The paper's Table 1: Pearson correlation of each variation (and `Overall`) with each descriptor's mAP."""
    return Table.read_csv(_alegoria_resource("paper_table1.csv"))


def predominance_level(n_differing: np.ndarray, class_sizes: np.ndarray) -> np.ndarray:
    """The paper's 0–3 predominance level from how many images of a class differ from its reference image.

    `n_differing`, `class_sizes` (same shape) -> int64: 0 none, 1 anecdotal (one image), 2 multiple
    occurrences, 3 predominant (more than a third of the class).
    """
    n_differing, class_sizes = np.asarray(n_differing), np.asarray(class_sizes)
    return np.select([n_differing == 0, n_differing == 1, 3 * n_differing > class_sizes], [0, 1, 3], 2).astype(np.int64)


def predominance_from_tags(labels: Sequence[str | None], tags: Mapping[str, Sequence[str]]) -> VariationPredominance:
    """Class-level predominance derived from image-level tags, the first image of a class being its reference.

    `labels (N,)` (None: unlabelled, ignored) and `tags {column: (N,) values}` (e.g. heritage-wild's `medium`,
    `color`, `view`) -> classes × tag columns scored with `predominance_level`: the paper's annotation protocol,
    with "differs from the reference" read off the tags instead of judged by eye.
    """
    classes = sorted({label for label in labels if label is not None})
    if not classes or not tags:
        raise DataError("deriving predominance needs labelled images and at least one tag column")
    members = {c: [i for i, label in enumerate(labels) if label == c] for c in classes}
    sizes = np.array([len(members[c]) for c in classes], dtype=np.int64)
    columns = tuple(tags)
    differing = np.array([[sum(tags[t][i] != tags[t][members[c][0]] for i in members[c]) for t in columns]
                          for c in classes])
    scores = Table("class", tuple(classes), columns, predominance_level(differing, sizes[:, None]))
    return VariationPredominance(scores=scores, class_sizes=sizes)


def reproduce_paper_table1(n_resamples: int = 1000) -> tuple[Table, Table, dict[str, float]]:
    """Table 1 recomputed from the paper's Table 3 (mAPs and predominance over the 39 Alegoria classes).

    Returns `(reproduced, paper, max_abs_difference per descriptor column)`; see tests/unit/test_alegoria_tables
    for where and why the paper's two tables disagree.
    """
    import warnings

    from hetretrieval.analysis.correlation import CorrelationWarning, correlate, correlation_matrix

    predominance = alegoria_variation_predominance().with_overall_difficulty()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorrelationWarning)
        reproduced = correlation_matrix(correlate(predominance, paper_table3_map(), n_resamples=n_resamples))
    paper = paper_table1().select(index=reproduced.index, columns=reproduced.columns)
    difference = np.abs(reproduced.values - paper.values).max(axis=0)
    return reproduced, paper, {d: float(v) for d, v in zip(paper.columns, difference, strict=True)}
