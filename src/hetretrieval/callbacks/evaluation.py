"""The evaluation callback: gather descriptors -> search -> metrics -> result files -> loggers.

It runs at the end of `trainer.predict`. Under DDP each rank holds the descriptors of its own batches; they
are gathered on every rank, de-duplicated by original index and put back in dataset order, and rank 0 does the
search, writes the run directory and logs.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch.distributed as dist

from hetretrieval.analysis.results import SUMMARY, class_metadata, write_run
from hetretrieval.analysis.tables import format_table
from hetretrieval.data.datamodule import merge_gathered
from hetretrieval.metrics.retrieval import RetrievalResults, evaluate_retrieval
from hetretrieval.metrics.revisited import PROTOCOLS, evaluate_revisited, rank_database, revisited_summary

log = logging.getLogger(__name__)

REVISITED = "revisited.json"


def _all_gather(obj):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]


class RetrievalEvaluation(pl.Callback):
    """Evaluate the predicted descriptors on the datamodule's `RetrievalDataset` and write/log the results."""

    def __init__(self, output_dir: str | Path, ks: Sequence[int] = (1, 5, 10), top_k: int = 100,
                 max_batch_entries: int = 1 << 24, report: bool = True, show_classes: int = 10) -> None:
        self.output_dir = Path(output_dir)
        self.report = report
        self.ks = tuple(int(k) for k in ks)
        self.top_k = top_k
        self.max_batch_entries = max_batch_entries
        self.show_classes = show_classes
        self.summary: dict | None = None
        self.results: RetrievalResults | None = None

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._indices, self._descriptors, self._failed = [], [], {}
        self._started = time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if outputs["index"].numel():
            self._indices.append(outputs["index"].numpy())
            self._descriptors.append(outputs["descriptors"].numpy())
        for index, reason in outputs["failed"]:
            log.warning("skipping image: %s", reason)
            self._failed[int(index)] = reason

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        extraction_seconds = time.perf_counter() - self._started
        gathered = _all_gather(self._rank_state())
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        dataset = datamodule.dataset
        descriptors, valid = merge_gathered([state[0] for state in gathered], len(dataset))
        skipped = dict(datamodule.unreadable)
        for state in gathered:
            skipped.update(state[1])
        for index in np.flatnonzero(~valid):  # e.g. fast_dev_run / limit_predict_batches: say so, never hide it
            skipped.setdefault(int(index), "not extracted (prediction stopped early: fast_dev_run or a batch limit)")
        started = time.perf_counter()
        self.results, info = self._score(descriptors, valid, dataset, pl_module, gathered)
        info.update({
            "dim": int(descriptors.shape[1]),
            "scales": list(pl_module.scales),
            "max_size": datamodule.max_size,
            "device": str(pl_module.device),
            "timings": {"extraction_s": round(extraction_seconds, 3),
                        "images_per_s": round(int(valid.sum()) / max(extraction_seconds, 1e-9), 2),
                        "search_and_metrics_s": round(time.perf_counter() - started, 3)},
        })
        self.summary = write_run(self.output_dir, dataset, self.results, descriptors, valid, skipped, info, self.ks)
        self._write_extras(dataset, descriptors, valid)
        figures = self._write_report() if self.report else {}
        self._log(trainer, dataset, figures)
        self._print(dataset)

    def _rank_state(self) -> tuple:
        """What this rank contributes to the gather: `((indices, descriptors), failures, ...)`."""
        local = (np.concatenate(self._indices) if self._indices else np.zeros(0, np.int64),
                 np.concatenate(self._descriptors) if self._descriptors else np.zeros((0, 0), np.float32))
        return local, self._failed

    def _score(self, descriptors: np.ndarray, valid: np.ndarray, dataset, pl_module, gathered: list
               ) -> tuple[RetrievalResults, dict]:
        """Rank and score: exact search over the global descriptors. Returns the results and run facts."""
        results = evaluate_retrieval(descriptors, dataset, valid, self.ks, self.top_k, self.max_batch_entries)
        return results, {"descriptor": pl_module.descriptor_name, "backbone": pl_module.backbone.model_name}

    def _write_extras(self, dataset, descriptors: np.ndarray, valid: np.ndarray) -> None:
        """Protocol-specific files: the official revisitop scores for Revisited Oxford/Paris."""
        if getattr(dataset, "ground_truth", None) is not None:
            self._evaluate_revisited(dataset, descriptors)

    def _evaluate_revisited(self, dataset, descriptors: np.ndarray) -> None:
        """Revisited Oxford/Paris: the official Easy/Medium/Hard scores, into revisited.json and the summary."""
        ranking = rank_database(descriptors[dataset.query_ids], descriptors[dataset.database_ids],
                                self.max_batch_entries)
        scores = revisited_summary(evaluate_revisited(ranking, dataset.ground_truth.queries, self.ks))
        (self.output_dir / REVISITED).write_text(json.dumps(scores, indent=2))
        self.summary.update(scores)
        (self.output_dir / SUMMARY).write_text(json.dumps(self.summary, indent=2, default=str))

    def _write_report(self) -> dict[str, Path]:
        """Figure-4 grids of the best and worst classes, the per-class heatmap and, when the images carry
        variation tags, their correlation with per-class mAP, under `report/` (the results are already saved:
        a failure here is reported, not fatal)."""
        from hetretrieval.analysis.comparison import compare_runs
        from hetretrieval.analysis.retrieval_figures import best_and_worst_grids

        report_dir = self.output_dir / "report"
        try:
            paths = best_and_worst_grids(self.output_dir, report_dir)
            paths.update(compare_runs([self.output_dir], annotations="auto").write(report_dir))
        except Exception as error:  # noqa: BLE001 - reporting must not lose the evaluation just written
            log.warning("could not write the run report (%s: %s); results are saved", type(error).__name__, error)
            return {}
        return paths

    def _per_class_rows(self, dataset) -> list[dict]:
        return [{"class": label, "n_queries": n, "mAP": m, **class_metadata(dataset, label)}
                for label, (n, m) in self.results.per_class.items()]

    def _log(self, trainer: pl.Trainer, dataset, report: dict[str, Path]) -> None:
        scalars = {k: v for k, v in self.summary.items() if isinstance(v, float)}
        scalars.update({f"class_mAP/{label}": m for label, (n, m) in self.results.per_class.items() if n})
        for logger in trainer.loggers:
            logger.log_metrics(scalars)
            if type(logger).__name__ == "WandbLogger":
                rows = self._per_class_rows(dataset)
                logger.log_table("per_class_map", columns=["class", "n_queries", "mAP"],
                                 data=[[r["class"], r["n_queries"], r["mAP"]] for r in rows])
                for name, path in report.items():
                    if path.suffix == ".png":
                        logger.log_image(f"report/{name}", images=[str(path)])
                    elif name == "correlations_csv":
                        with path.open(newline="") as handle:
                            table = list(csv.reader(handle))
                        logger.log_table("correlations", columns=table[0], data=table[1:])
            logger.save()

    def _print(self, dataset) -> None:
        rows = sorted(self._per_class_rows(dataset), key=lambda r: (r["mAP"] != r["mAP"], -(r["mAP"] or 0)))
        shown = rows if len(rows) <= self.show_classes else rows[: self.show_classes // 2] + rows[-self.show_classes // 2:]
        s = self.summary
        print(f"\n{s['descriptor']} on {s['dataset']} ({s['backbone']}, {s['counts']['evaluated_queries']} queries, "
              f"{s['counts']['database']} database images, {s['counts']['skipped']} skipped)")
        print(format_table(shown, ["class", "n_queries", "mAP"]))
        print(f"mAP {s['mAP']:.4f}   class mAP {s['class_mAP']:.4f}   "
              + "   ".join(f"mP@{k} {s[f'mP@{k}']:.4f}" for k in self.ks if s.get(f"mP@{k}") is not None)
              + f"   ({s['timings']['images_per_s']:.1f} images/s)")
        if "mAP_medium" in s:
            print("revisited protocols: " + "   ".join(f"{p} mAP {s[f'mAP_{p}']:.4f}" for p in PROTOCOLS))
        print(f"results written to {self.output_dir}")
