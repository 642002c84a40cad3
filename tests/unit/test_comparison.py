"""Comparing saved runs, tag-derived annotations and the tag breakdown, on hand-made runs (no extraction)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from hetretrieval.analysis.annotations import predominance_from_tags, predominance_level
from hetretrieval.analysis.breakdown import tag_breakdown
from hetretrieval.analysis.comparison import best_mask, compare_runs, find_runs, run_labels
from hetretrieval.analysis.results import load_images, load_run
from hetretrieval.analysis.retrieval_figures import best_and_worst_grids, extreme_classes, grid_rows
from hetretrieval.data.datasets import ImageRecord, make_dataset
from hetretrieval.data.images import save_image
from hetretrieval.errors import ConfigError, DataError
from hetretrieval.evaluation.run_files import write_run
from hetretrieval.metrics.retrieval import evaluate_retrieval

# 3 classes x 2 domains; class c2's photo image is reversed in descriptor space (a domain failure).
LABELS = ["c0", "c0", "c1", "c1", "c2", "c2"]
DOMAINS = ["photo", "sketch", "photo", "sketch", "photo", "sketch"]


def _descriptors(noise: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = np.eye(4)[[0, 0, 1, 1, 2, 2]] + noise * rng.standard_normal((6, 4))
    base[5] = np.eye(4)[3]  # the c2 sketch looks like nothing else
    return (base / np.linalg.norm(base, axis=1, keepdims=True)).astype(np.float32)


def _write(directory: Path, images: Path, descriptor: str, noise: float):
    records = [ImageRecord(images / f"{i}.png", label, {"domain": domain})
               for i, (label, domain) in enumerate(zip(LABELS, DOMAINS, strict=True))]
    dataset = make_dataset("toy", records)
    descriptors = _descriptors(noise)
    results = evaluate_retrieval(descriptors, dataset.labels, dataset.query_ids, dataset.database_ids, ks=(1,),
                                 top_k=5)
    write_run(directory, dataset, results, descriptors, np.ones(6, bool), {},
              {"descriptor": descriptor, "backbone": "toy"}, (1,))


@pytest.fixture
def sweep_dir(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        save_image(torch.full((3, 8, 8), i / 6), images / f"{i}.png")
    for n, (name, noise) in enumerate((("mac", 0.0), ("gem", 0.3))):
        _write(tmp_path / "sweep" / f"{n}_{name}", images, name, noise)
    return tmp_path / "sweep"


def test_predominance_level_follows_the_paper_scale():
    assert predominance_level(np.array([0, 1, 2, 3, 4]), np.array([9, 9, 9, 9, 9])).tolist() == [0, 1, 2, 2, 3]


def test_predominance_from_tags_compares_with_the_first_image():
    scores = predominance_from_tags(["a", "a", "a", "a", None, "b", "b"],
                                    {"view": ["g", "g", "x", "x", "x", "g", "g"]}).scores
    assert scores.index == ("a", "b") and scores.values[:, 0].tolist() == [3.0, 0.0]


def test_best_mask_keeps_ties_and_skips_nan():
    values = np.array([[0.1, 0.5, 0.4, 0.3, 0.3], [np.nan, 0.2, np.nan, np.nan, np.nan]])
    assert best_mask(values).tolist() == [[False, True, True, True, True], [False, True, False, False, False]]


def test_run_labels_qualify_only_what_varies():
    class Run:
        def __init__(self, backbone, descriptor):
            self.summary, self.descriptor = {"backbone": backbone, "dataset": "d"}, descriptor

    assert run_labels([Run("r", "mac"), Run("r", "gem")]) == ["mac", "gem"]
    assert run_labels([Run("r", "mac"), Run("v", "mac")]) == ["r/mac", "v/mac"]
    assert run_labels([Run("r", "mac"), Run("r", "mac")]) == ["mac#1", "mac#2"]


def test_compare_runs_tables_and_tag_correlation(sweep_dir, tmp_path):
    assert [p.name for p in find_runs([sweep_dir])] == ["0_mac", "1_gem"]
    with pytest.warns(UserWarning, match="only 3 classes"):
        comparison = compare_runs([sweep_dir], annotations="tags", n_resamples=50)
    assert comparison.labels == ("mac", "gem")
    mac = load_run(sweep_dir / "0_mac")
    expected = {row["class"]: float(row["mAP"]) for row in mac.per_class}
    assert dict(zip(comparison.per_class.index, comparison.per_class.column("mac"), strict=True)) == expected
    rows = comparison.class_rows()
    assert rows[0]["Avg"] == pytest.approx(np.nanmean(comparison.per_class.values[0]))
    assert {r["Overall"] for r in rows} == {1}  # one image of each class (of two) is in the other domain
    paths = comparison.write(tmp_path / "report")
    assert {"markdown", "per_class_csv", "per_class_heatmap", "correlation_heatmap"} <= set(paths)
    assert all(p.is_file() for p in paths.values())
    assert "**" in paths["markdown"].read_text()


def test_find_runs_fails_clearly(tmp_path):
    with pytest.raises(DataError, match="no run directories"):
        find_runs([tmp_path])


def test_tag_breakdown_hand_computed(sweep_dir):
    run = sweep_dir / "0_mac"
    result = tag_breakdown(run, "domain")
    table = result.mean_average_precision
    assert table.index == ("photo", "sketch") and table.columns == ("photo", "sketch", "all")
    # photo queries vs the sketch database: c0 and c1 find their sketch first (AP 1); c2's sketch is unrelated
    # and is ranked 3rd of 3 (AP 1/3).
    assert table.values[0, 1] == pytest.approx((1 + 1 + 1 / 3) / 3)
    # same-domain cells: a query's only positive is in the other domain -> no evaluated query
    assert np.isnan(table.values[0, 0]) and result.n_queries.values[0, 0] == 0
    images = load_images(run)
    assert images.query.all() and images.described.all() and images.records[0].metadata == {"domain": "photo"}
    with pytest.raises(ConfigError, match="tag 'view'"):
        tag_breakdown(run, "view")


def test_figure4_grids(sweep_dir, tmp_path):
    run = load_run(sweep_dir / "0_mac")
    best, worst = extreme_classes(run.per_class, 1)
    assert best == ["c0"] and worst == ["c2"]
    (row,) = grid_rows(sweep_dir / "0_mac", ["c0"], top_k=2)
    assert row.relevant[0] and row.label == "c0"
    paths = best_and_worst_grids(sweep_dir / "0_mac", tmp_path / "figures", n_classes=2, top_k=3)
    assert all(p.stat().st_size > 1000 for p in paths.values())
