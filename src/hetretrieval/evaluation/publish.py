"""Where a scored run goes besides its folder: the report figures, the experiment loggers and the console."""

from __future__ import annotations

import csv
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from hetretrieval.analysis.correlation import CorrelationWarning
from hetretrieval.analysis.results import NEIGHBOURS
from hetretrieval.analysis.tables import format_table
from hetretrieval.loggers import is_wandb
from hetretrieval.metrics.revisited import PROTOCOLS

log = logging.getLogger(__name__)

REPORT_RESULTS = 5  # results shown per query in the report's best / worst class grids


def write_report(run_dir: Path) -> dict[str, Path]:
    """Figure-4 grids of the best and worst classes, the per-class heatmap and, when the images carry variation
    tags, their correlation with per-class mAP, under `report/`, and `report/index.html` showing them all
    (`html`). The results are already saved: a failure here is reported, never fatal."""
    from hetretrieval.analysis.comparison import compare_runs
    from hetretrieval.analysis.html_report import write_run_report
    from hetretrieval.analysis.retrieval_figures import best_and_worst_grids

    report_dir = run_dir / "report"
    try:
        with warnings.catch_warnings(record=True) as caveats:  # e.g. constant tags: said once, in the log
            warnings.simplefilter("always", CorrelationWarning)
            saved = np.load(run_dir / NEIGHBOURS, mmap_mode="r").shape[1]  # fewer than 5 in a tiny (debug) run
            paths = best_and_worst_grids(run_dir, report_dir, top_k=min(REPORT_RESULTS, saved))
            paths.update(compare_runs([run_dir], annotations="auto").write(report_dir))
            paths["html"] = write_run_report(run_dir, paths)
    except Exception as error:  # noqa: BLE001 - reporting must not lose the evaluation just written
        log.warning("could not write the run report (%s: %s); results are saved", type(error).__name__, error)
        return {}
    for caveat in caveats:
        log.info("report: %s", caveat.message)
    return paths


def log_run(loggers: Sequence, summary: Mapping, class_rows: Sequence[Mapping], report: Mapping[str, Path]) -> None:
    """Scalars (metrics, timings, counts, dim) to every logger; the per-class table and figures to W&B."""
    scalars = {k: v for k, v in summary.items() if isinstance(v, float)}
    scalars.update({f"timings/{k}": v for k, v in summary.get("timings", {}).items()})
    scalars.update({f"counts/{k}": v for k, v in summary.get("counts", {}).items()})
    scalars.update({f"class_mAP/{row['class']}": row["mAP"] for row in class_rows if row["mAP"] is not None})
    for logger in loggers:
        logger.log_metrics(scalars)
        if is_wandb(logger):
            logger.experiment.summary.update({"dim": summary.get("dim"), **scalars})
            logger.log_table("per_class_map", columns=["class", "n_queries", "mAP"],
                             data=[[r["class"], r["n_queries"], r["mAP"]] for r in class_rows])
            for name, path in report.items():
                if path.suffix == ".png":
                    logger.log_image(f"report/{name}", images=[str(path)])
                elif name == "correlations_csv":
                    with path.open(newline="") as handle:
                        table = list(csv.reader(handle))
                    logger.log_table("correlations", columns=table[0], data=table[1:])
        logger.save()


def _metric(value) -> str:
    """A metric for the console: 4 decimals, or `n/a` where undefined (no query with a positive)."""
    return "n/a" if value is None else f"{value:.4f}"


def print_run(summary: Mapping, class_rows: Sequence[Mapping], ks: Sequence[int], run_dir: Path,
              show_classes: int = 10) -> None:
    """The run's per-class table (best and worst classes) and headline metrics."""
    rows = sorted(class_rows, key=lambda r: (r["mAP"] is None, -(r["mAP"] or 0)))
    hidden = max(0, len(rows) - show_classes)
    shown = rows if not hidden else rows[: show_classes // 2] + rows[len(rows) - show_classes // 2:]
    counts = summary["counts"]
    print(f"\n{summary['descriptor']} on {summary['dataset']} ({summary['backbone']}, {counts['evaluated_queries']} "
          f"queries, {counts['database']} database images, {counts['skipped']} skipped)")
    print(format_table(shown, ["class", "n_queries", "mAP"]))
    if hidden:
        print(f"… {hidden} more classes (all in {run_dir / 'per_class_map.csv'})")
    timings = summary.get("timings", {})
    speed = f"   ({timings['images_per_s']:.1f} images/s)" if timings.get("images_per_s") else ""
    print(f"mAP {_metric(summary['mAP'])}   class mAP {_metric(summary['class_mAP'])}   "
          + "   ".join(f"mP@{k} {_metric(summary.get(f'mP@{k}'))}" for k in ks) + speed)
    if "mAP_medium" in summary:
        print("revisited protocols: " + "   ".join(f"{p} mAP {_metric(summary[f'mAP_{p}'])}" for p in PROTOCOLS))
    if "mAP_before_expansion" in summary:
        settings = "   ".join(f"{key} {summary[key]}" for key in ("query_expansion", "dba") if summary.get(key))
        print(f"mAP before expansion {_metric(summary['mAP_before_expansion'])}   ({settings})")
    if summary.get("whitening"):
        w = summary["whitening"]
        print(f"whitening {w['kind']} to {w['dim']} dims, fitted on {w['fit_images']} images of {w['fit_on']}"
              + (f" {w['fit_options']}" if w.get("fit_options") else ""))
    print(f"results written to {run_dir}")
