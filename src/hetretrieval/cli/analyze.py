"""`hetretrieval-analyze`: compare, correlate and break down saved runs; run the controlled variation study.

Every task but `study` reads run directories written by `hetretrieval-eval` and re-describes no image.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from hetretrieval.analysis.annotations import reproduce_paper_table1
from hetretrieval.analysis.correlation import (
    CorrelationWarning,
    Table,
    correlate,
    correlation_matrix,
    plot_correlation_heatmap,
    plot_table_heatmap,
    write_correlations_csv,
)
from hetretrieval.analysis.tables import format_table
from hetretrieval.config import CONFIG_DIR, check_entry_point, instantiate
from hetretrieval.errors import ConfigError, HetRetrievalError

log = logging.getLogger(__name__)


def _runs(cfg: DictConfig, single: bool = False) -> list[str]:
    runs = [str(r) for r in (cfg.runs or [])]
    if not runs:
        raise ConfigError(f"task '{cfg.task}' needs runs=[<run or multirun directory>, ...]")
    if single and len(runs) != 1:
        raise ConfigError(f"task '{cfg.task}' takes one run directory, got {len(runs)}")
    return runs


def _print_table(table: Table, float_format: str = "{:.3f}") -> None:
    rows = [{table.index_name: label, **dict(zip(table.columns, map(float, line), strict=True))}
            for label, line in zip(table.index, table.values, strict=True)]
    print(format_table(rows, [table.index_name, *table.columns], float_format))


def sweep(cfg: DictConfig, output_dir: Path) -> dict[str, Path]:
    """Collect every run of a sweep into one comparison table, correlation and heatmaps."""
    from hetretrieval.analysis.comparison import compare_runs

    comparison = compare_runs(_runs(cfg), cfg.annotations, cfg.bootstrap_resamples, cfg.seed)
    paths = comparison.write(output_dir)
    print(format_table(comparison.summary_rows(), list(comparison.summary_rows()[0])))
    for note in comparison.notes:
        print(f"note: {note}")
    if comparison.correlations:
        print("\nPearson r of per-class mAP with predominance:")
        _print_table(comparison.correlation_table(), "{:+.2f}")
    return paths


def correlate_task(cfg: DictConfig, output_dir: Path) -> dict[str, Path]:
    """Variations × descriptors correlations from saved per-class results or a mAP table CSV."""
    from hetretrieval.analysis.comparison import resolve_annotations

    if cfg.mean_ap_table is None:
        return sweep(cfg, output_dir)
    if cfg.annotations in (None, "none", "auto", "tags"):
        raise ConfigError("correlating a mAP table needs annotations=<predominance CSV> or annotations=alegoria")
    predominance = resolve_annotations(cfg.annotations, None).with_overall_difficulty()
    correlations = correlate(predominance, Table.read_csv(cfg.mean_ap_table), cfg.bootstrap_resamples,
                             seed=cfg.seed)
    matrix = correlation_matrix(correlations)
    _print_table(matrix, "{:+.2f}")
    return {"correlations_csv": write_correlations_csv(correlations, output_dir / "correlations.csv"),
            "correlation_csv": matrix.write_csv(output_dir / "correlation_pearson.csv"),
            "correlation_heatmap": plot_correlation_heatmap(matrix, output_dir / "correlation_heatmap.png")}


def paper_table1(cfg: DictConfig, output_dir: Path) -> dict[str, Path]:
    """The paper's Table 3 mAPs in, its Table 1 out, with the max |difference| per descriptor column."""
    reproduced, paper, difference = reproduce_paper_table1(cfg.bootstrap_resamples)
    _print_table(reproduced, "{:+.2f}")
    print("\nmax |reproduced - paper| per descriptor: "
          + "  ".join(f"{d} {v:.3f}" for d, v in difference.items()))
    difference_table = Table("variation", reproduced.index, reproduced.columns, reproduced.values - paper.values)
    return {"reproduced_csv": reproduced.write_csv(output_dir / "table1_reproduced.csv"),
            "difference_csv": difference_table.write_csv(output_dir / "table1_difference.csv"),
            "heatmap": plot_correlation_heatmap(reproduced, output_dir / "table1_reproduced.png",
                                                "Table 1 recomputed from Table 3")}


def breakdown(cfg: DictConfig, output_dir: Path) -> dict[str, Path]:
    """Query tag × database tag mAP matrix of one saved run."""
    from hetretrieval.analysis.breakdown import tag_breakdown

    (run,) = _runs(cfg, single=True)
    result = tag_breakdown(run, cfg.breakdown.tag)
    _print_table(result.mean_average_precision)
    name = f"breakdown_{result.tag}"
    return {"map_csv": result.mean_average_precision.write_csv(output_dir / f"{name}_map.csv"),
            "counts_csv": result.n_queries.write_csv(output_dir / f"{name}_queries.csv"),
            "heatmap": plot_table_heatmap(result.mean_average_precision, output_dir / f"{name}.png",
                                          f"mAP: query {result.tag} x database {result.tag}")}


def figures(cfg: DictConfig, output_dir: Path) -> dict[str, Path]:
    """Figure 4 grids of the best and worst classes of one saved run."""
    from hetretrieval.analysis.retrieval_figures import best_and_worst_grids

    (run,) = _runs(cfg, single=True)
    return best_and_worst_grids(run, output_dir, cfg.figures.n_classes, cfg.figures.top_k)


def study(cfg: DictConfig, output_dir: Path) -> dict[str, Path]:
    """Controlled variation study on `cfg.dataset`: mAP vs strength for every head of `heads` (options of the
    `pooling` group, as `hetretrieval-eval heads=[...]`), one variation at a time."""
    from hetretrieval.config import ExtractionOptions, compose_option, typed
    from hetretrieval.evaluation.scoring import LocalScoring
    from hetretrieval.evaluation.study import PRESETS, StudyPlan, variation_study, write_study
    from hetretrieval.extraction.batching import ImagePlan, ImageSource
    from hetretrieval.extraction.engine import ExtractionEngine, default_device
    from hetretrieval.index.local import LocalSearchOptions
    from hetretrieval.models.factory import build_heads
    from hetretrieval.models.network import RetrievalNetwork

    options = cfg.study
    extraction = typed(cfg.extraction, ExtractionOptions, "extraction")
    local_search = typed(OmegaConf.create(OmegaConf.to_container(cfg.local_search, resolve=True)),
                         LocalSearchOptions, "local_search")
    if options.preset is not None:
        if options.preset not in PRESETS:
            raise ConfigError(f"unknown study preset '{options.preset}'; choose one of {sorted(PRESETS)}")
        plans = [PRESETS[options.preset]]
    else:
        plans = [StudyPlan(v, tuple(options.strengths), options.apply_to) for v in options.variations]
    nodes = {str(name): compose_option("pooling", str(name), cfg) for name in cfg.heads}
    verifier = instantiate(cfg.verification)
    dataset = instantiate(cfg.dataset)
    backbone = instantiate(cfg.backbone)
    global_heads, local = build_heads(nodes, backbone)
    source = ImageSource(extraction.max_size, extraction.max_pixels)
    network = (RetrievalNetwork(backbone, global_heads, extraction.scales, None, extraction.scale_aggregation)
               if global_heads else None)
    engine = ExtractionEngine.from_options(network, local, extraction).to(default_device())
    plan = ImagePlan.scan(dataset.records, source)
    engine.prepare(dataset, plan)  # NetVLAD: k-means on the clean images before the study
    rows = variation_study(dataset, engine, plans, plan, options.queries_per_class, cfg.seed,
                           local_scoring=LocalScoring(verifier, local_search),
                           pca_dims={n: getattr(h, "pca_dim", None) for n, h in local.items()})
    print(format_table(rows, ["variation", "apply_to", "strength", "descriptor", "n_queries", "mAP", "mP@1"]))
    name = f"study_{options.preset}" if options.preset else "study"
    return write_study(rows, output_dir, name)


TASKS = {"sweep": sweep, "compare": sweep, "correlate": correlate_task, "paper-table1": paper_table1,
         "breakdown": breakdown, "figures": figures, "study": study}


def analyze(cfg: DictConfig) -> dict[str, Path]:
    """Run `cfg.task`; returns the files it wrote by name."""
    if cfg.task not in TASKS:
        raise ConfigError(f"unknown task '{cfg.task}'; choose one of {', '.join(TASKS)}")
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("always", CorrelationWarning)
        warnings.showwarning = _show_warning
        paths = TASKS[cfg.task](cfg, output_dir)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return paths


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="analyze")
def main(cfg: DictConfig) -> None:
    try:
        check_entry_point(cfg, "hetretrieval-analyze")
        analyze(cfg)
    except HetRetrievalError as error:
        raise SystemExit(f"hetretrieval-analyze: {error}") from None


if __name__ == "__main__":
    main()
