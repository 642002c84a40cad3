"""End to end: a Hydra multirun over the four global poolings with offline W&B, then `analyze sweep` on it;
the study and the domain breakdown on a handful of real PACS images."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hetretrieval.analysis.breakdown import tag_breakdown
from hetretrieval.data.datasets import ImageRecord, csv_manifest, list_images, make_dataset
from hetretrieval.evaluation.run_files import write_run
from hetretrieval.evaluation.study import StudyPlan, variation_study
from hetretrieval.extraction.batching import ImageSource
from hetretrieval.extraction.engine import ExtractionEngine
from hetretrieval.metrics.retrieval import evaluate_retrieval
from hetretrieval.models.backbones import Backbone
from hetretrieval.models.network import RetrievalNetwork
from hetretrieval.models.pooling.heads import MAC, RMAC, SPoC

PROJECT = Path(__file__).resolve().parents[2]
TINY_BUILTIN = ["dataset.photos=[astronaut,coffee,chelsea]", "dataset.variants_per_class=3", "dataset.image_size=64",
                "extraction.max_size=64"]


def _run(module: str, *overrides: str) -> str:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"}
    done = subprocess.run([sys.executable, "-m", module, *overrides], cwd=PROJECT,
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_multirun_four_poolings_offline_wandb_then_sweep(tmp_path):
    sweep = tmp_path / "multirun"
    _run("hetretrieval.cli.evaluate", "-m", "pooling=mac,spoc,gem,rmac", "logger=many_loggers", *TINY_BUILTIN,
         f"hydra.sweep.dir={sweep}", f"dataset.cache_dir={tmp_path / 'cache'}")
    runs = sorted(p.name for p in sweep.iterdir() if (p / "summary.json").is_file())
    assert runs == ["0_pooling=mac", "1_pooling=spoc", "2_pooling=gem", "3_pooling=rmac"]  # the swept override
    assert all(len(list((sweep / r / "wandb").glob("offline-run-*"))) == 1 for r in runs)

    report = tmp_path / "report"
    out = _run("hetretrieval.cli.analyze", "task=sweep", f"runs=[{sweep}]", "bootstrap_resamples=100",
               f"hydra.run.dir={report}")
    assert "rmac" in out
    markdown = (report / "comparison.md").read_text()
    assert "| class | n_queries | pooling=mac | pooling=spoc | pooling=gem | pooling=rmac | Avg |" in markdown
    assert (report / "per_class_map.png").stat().st_size > 1000
    # the builtin images carry per-variation strengths: class annotations derived from them are correlated
    assert (report / "correlation_heatmap.png").stat().st_size > 1000
    with (report / "comparison.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 3


def test_sweep_over_runs_of_different_datasets_says_so_and_still_compares(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(images / f"{i}.png")
    descriptors = np.eye(6, dtype=np.float32)[[0, 0, 1, 1, 2, 2]]
    for name, classes in (("set_a", ["a0", "a1", "a2"]), ("set_b", ["b0", "b1", "b2"])):
        dataset = make_dataset(name, [ImageRecord(images / f"{i}.png", classes[i // 2], {"domain": "photo" if i % 2
                                                  else "sketch"}) for i in range(6)])
        results = evaluate_retrieval(descriptors, dataset.labels, dataset.query_ids, dataset.database_ids, ks=(1,),
                                     top_k=5)
        write_run(tmp_path / "runs" / name, dataset, results, descriptors, np.ones(6, bool), {},
                  {"descriptor": "gem", "backbone": "toy", "overrides": [f"dataset={name}", "pooling=gem"]}, (1,))
    report = tmp_path / "report"
    out = _run("hetretrieval.cli.analyze", "task=sweep", f"runs=[{tmp_path / 'runs'}]", "annotations=tags",
               "bootstrap_resamples=100", f"hydra.run.dir={report}")
    assert "note: the runs are of 2 different datasets (set_a, set_b)" in out
    assert "no correlation with the class annotations (those of set_a)" in out
    markdown = (report / "comparison.md").read_text()
    assert "| class | n_queries | dataset=set_a | dataset=set_b | Avg | Overall |" in markdown
    assert "| a0 | 2 | **1.000** | - | 1.000 | 1 |" in markdown and "| b2 | 2 | - | **1.000** | 1.000 | - |" in markdown


@pytest.fixture(scope="module")
def pacs_subset(pacs_root, tmp_path_factory):
    """2 domains x 3 classes x 3 images of the real PACS, as a CSV manifest with the domain as a tag."""
    manifest = tmp_path_factory.mktemp("pacs") / "subset.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "label", "domain"])
        for domain in ("photo", "sketch"):
            for label in ("dog", "guitar", "house"):
                for path in list_images(pacs_root / domain / label)[:3]:
                    writer.writerow([path.relative_to(pacs_root), label, domain])
    return csv_manifest(manifest, root=pacs_root, name="pacs_subset")


def test_study_on_real_pacs_images(pacs_subset):
    network = RetrievalNetwork(Backbone("tf_efficientnet_lite0", pretrained=True),
                               {"mac": MAC(), "spoc": SPoC(), "rmac": RMAC()})
    rows = variation_study(pacs_subset, ExtractionEngine(network), [StudyPlan("rotation", (0.0, 1.0))],
                           ImageSource(max_size=64), queries_per_class=2)
    assert {(r["descriptor"], r["strength"]) for r in rows} == {(d, s) for d in ("mac", "spoc", "rmac")
                                                                for s in (0.0, 1.0)}
    assert all(r["n_queries"] == 6 and r["n_database"] == 12 and 0 < r["mAP"] <= 1 for r in rows)


def test_domain_breakdown_of_a_real_pacs_run(pacs_subset, tmp_path):
    network = RetrievalNetwork(Backbone("tf_efficientnet_lite0", pretrained=True), {"spoc": SPoC()})
    descriptors = ExtractionEngine(network).extract(pacs_subset.records, ImageSource(max_size=64)).descriptors["spoc"]
    results = evaluate_retrieval(descriptors, pacs_subset.labels, pacs_subset.query_ids, pacs_subset.database_ids,
                                 ks=(1,), top_k=5)
    write_run(tmp_path, pacs_subset, results, descriptors, np.ones(len(pacs_subset), bool), {}, {}, (1,))
    table = tag_breakdown(tmp_path, "domain").mean_average_precision
    assert table.index == ("photo", "sketch") and table.columns == ("photo", "sketch", "all")
    assert np.all((table.values > 0) & (table.values <= 1))
    # photo->photo is the easy cell, the cross-domain ones are harder
    assert table.values[0, 0] > table.values[0, 1]
