"""Controlled variation study: mAP as one variation grows in strength, per descriptor (a causal robustness curve).

The paper could only correlate per-class mAP with annotated variations; here one variation of
`data/variations.py` is applied at graded strengths, everything else fixed. With `apply_to="queries"` only the
queries change: they are held out of the database, so a varied query cannot find its own clean original. With
`apply_to="all"` every image changes and the dataset's own protocol is kept: the paper's grayscale experiment
(Table 2) is the `grayscale` preset. The extraction engine reads each image once and each (image, strength)
goes through the backbone once; every head describes the same feature map.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from hetretrieval.analysis.figures import save_figure
from hetretrieval.config import EvaluationOptions
from hetretrieval.data.datasets import RetrievalDataset
from hetretrieval.data.variations import apply_variation, get_variation
from hetretrieval.errors import ConfigError, DataError
from hetretrieval.evaluation.scoring import LocalScoring, score_global, score_local
from hetretrieval.extraction.batching import ImagePlan, ImageSource
from hetretrieval.extraction.engine import Extraction, ExtractionEngine, View
from hetretrieval.metrics.retrieval import metric_summary
from hetretrieval.seeding import mix_seed

log = logging.getLogger(__name__)

APPLY_TO = ("queries", "all")


@dataclass(frozen=True)
class StudyPlan:
    """One variation at graded `strengths` in [0, 1], applied to the queries only or to every image."""

    variation: str
    strengths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    apply_to: str = "queries"

    def __post_init__(self) -> None:
        get_variation(self.variation)
        if self.apply_to not in APPLY_TO:
            raise ConfigError(f"apply_to must be one of {APPLY_TO}, got '{self.apply_to}'")
        if not self.strengths or any(not 0.0 <= s <= 1.0 for s in self.strengths):
            raise ConfigError(f"strengths must be a non-empty list in [0, 1], got {list(self.strengths)}")
        object.__setattr__(self, "strengths", tuple(sorted({float(s) for s in self.strengths})))


PRESETS: dict[str, StudyPlan] = {
    # The paper's Table 2: every image, queries and database, described in grayscale.
    "grayscale": StudyPlan("grayscale", (0.0, 1.0), "all"),
}


def hold_out_queries(dataset: RetrievalDataset, queries_per_class: int | None) -> RetrievalDataset:
    """Queries: up to `queries_per_class` of each class, evenly spread over its queries in dataset order;
    database: the dataset's database without them. None keeps every query (and leaves them all out)."""
    labels = dataset.labels
    chosen = []
    for label in sorted({labels[i] for i in dataset.query_ids}):
        members = [int(i) for i in dataset.query_ids if labels[i] == label]
        if queries_per_class is not None and len(members) > queries_per_class:
            members = [members[j] for j in np.linspace(0, len(members) - 1, queries_per_class).round().astype(int)]
        chosen.extend(members)
    query_ids = np.array(sorted(chosen), dtype=np.int64)
    database_ids = np.setdiff1d(dataset.database_ids, query_ids)
    if database_ids.size == 0:
        raise DataError(f"holding out the queries empties the database of '{dataset.name}'; "
                        "lower queries_per_class or give the dataset a separate database")
    return RetrievalDataset(dataset.name, dataset.records, query_ids, database_ids)


Condition = tuple[str, str, float]  # (variation, apply_to, strength)


def describe_varied(engine: ExtractionEngine, dataset: RetrievalDataset, source: ImageSource | ImagePlan,
                    plans: Sequence[tuple[StudyPlan, np.ndarray]], seed: int = 0) -> tuple[dict, Extraction]:
    """Descriptors of every image under every condition, in one pass of the extraction engine.

    `plans`: `(plan, varied (N,) bool)` pairs -> `{(variation, apply_to, strength): {head: key}}` naming the
    extraction's heads for that condition, and the `Extraction`. Strength 0 is the clean descriptor (computed
    once per image); images not `varied` keep it. The randomness of a variation (direction, position) is
    seeded from `seed` and the first varied image of the batch.
    """
    views: dict[str, View] = {}
    names: dict[Condition, str | None] = {}
    for plan, varied in plans:
        for strength in plan.strengths:
            condition = (plan.variation, plan.apply_to, strength)
            if strength == 0:
                names[condition] = None
                continue
            names[condition] = view = f"{plan.variation}@{strength:g}:{plan.apply_to}"
            views[view] = View(partial(_vary, variation=plan.variation, strength=strength, seed=seed), varied)
    extraction = engine.extract(dataset.records, source, views=views)
    for reason in extraction.skipped.values():
        log.warning("left out of queries and database: %s", reason)
    keys = {condition: {head: head if view is None else f"{view}/{head}" for head in engine.head_names}
            for condition, view in names.items()}
    return keys, extraction


def _vary(images: torch.Tensor, index: np.ndarray, variation: str, strength: float, seed: int) -> torch.Tensor:
    return apply_variation(images, variation, strength, mix_seed(seed, int(index[0])))


def variation_study(dataset: RetrievalDataset, engine: ExtractionEngine, plans: Sequence[StudyPlan],
                    source: ImageSource | ImagePlan, queries_per_class: int | None = 20, seed: int = 0,
                    ks: Sequence[int] = (1, 5, 10), local_scoring: LocalScoring | None = None,
                    pca_dims: dict[str, int | None] | None = None) -> list[dict]:
    """mAP, class mAP and mP@k / mR@k (`metric_summary`) for every (plan, strength, head): one row each.

    Query-only plans share one protocol (queries held out with `hold_out_queries`); `apply_to="all"` plans use
    the dataset's own. Every image is read and described clean once, whatever the number of plans. Local
    heads (DELF, ORB) are scored by local search with `local_scoring`, exactly as an evaluation run.
    """
    protocols = {"all": dataset}
    if any(plan.apply_to == "queries" for plan in plans):
        protocols["queries"] = hold_out_queries(dataset, queries_per_class)
    masks = []
    for plan in plans:
        varied = np.zeros(len(dataset), dtype=bool)
        varied[protocols["queries"].query_ids if plan.apply_to == "queries" else slice(None)] = True
        masks.append((plan, varied))
    keys, extraction = describe_varied(engine, dataset, source, masks, seed)
    options = EvaluationOptions(ks=list(ks), top_k=max(ks), report=False)
    rows = []
    for (variation, apply_to, strength), by_head in keys.items():
        for head, key in by_head.items():
            protocol = protocols[apply_to]
            if key in extraction.local_features:
                if local_scoring is None:
                    raise ConfigError(f"the study's local head '{head}' needs local search options")
                scored = score_local(extraction.local_features[key], extraction.valid, protocol, options,
                                     local_scoring, (pca_dims or {}).get(head))
            else:
                scored = score_global(extraction.descriptors[key], extraction.valid, protocol, options)
            results = scored.results
            rows.append({"variation": variation, "apply_to": apply_to, "strength": strength, "descriptor": head,
                         "n_queries": int(results.evaluated.sum()), "n_database": int(results.database_ids.size),
                         **metric_summary(results, ks)})
    return rows


def write_study(rows: Sequence[Mapping], output_dir: str | Path, name: str | None = None) -> dict[str, Path]:
    """Write `<name>.csv` (one row per strength and descriptor) and `<name>.png` (mAP vs strength curves)."""
    if not rows:
        raise DataError("no study rows to write")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    name = name or "study"
    csv_path = output_dir / f"{name}.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {"csv": csv_path, "plot": plot_study_curves(rows, output_dir / f"{name}.png")}


def plot_study_curves(rows: Sequence[Mapping], path: str | Path, metric: str = "mAP") -> Path:
    """One curve of `metric` vs strength per (variation, descriptor); one panel per variation."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    variations = list(dict.fromkeys(r["variation"] for r in rows))
    figure = Figure(figsize=(4.0 * len(variations), 3.4), layout="constrained")
    FigureCanvasAgg(figure)
    for panel, variation in enumerate(variations, start=1):
        axes = figure.add_subplot(1, len(variations), panel)
        subset = [r for r in rows if r["variation"] == variation]
        for descriptor in dict.fromkeys(r["descriptor"] for r in subset):
            points = sorted((r["strength"], np.nan if r[metric] is None else r[metric])
                            for r in subset if r["descriptor"] == descriptor)
            axes.plot(*zip(*points, strict=True), marker="o", label=descriptor)
        axes.set_title(f"{variation} ({subset[0]['apply_to']})")
        axes.set_xlabel("strength")
        axes.set_ylabel(metric)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    return save_figure(figure, path, dpi=150)
