"""The evaluation job end to end: outputs, batch invariance, every pooling, bad input, real data."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from brute_force_map import brute_force_map
from conftest import TINY_BUILTIN
from hetretrieval.cli.evaluate import evaluate
from hetretrieval.config import instantiate
from hetretrieval.errors import ConfigError, DataError
from hetretrieval.extraction.batching import ImageSource
from hetretrieval.extraction.engine import ExtractionEngine
from hetretrieval.models.backbones import Backbone
from hetretrieval.models.network import RetrievalNetwork
from hetretrieval.models.pooling.heads import GeM


def _read_csv(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("pooling", ["mac", "spoc", "gem", "rmac"])
def test_every_pooling_runs_and_writes_its_outputs(compose_eval, pooling, tmp_path):
    summary = evaluate(compose_eval(*TINY_BUILTIN, f"pooling={pooling}"))
    run = tmp_path / "run"
    assert summary["descriptor"] == pooling
    assert summary["mAP"] == pytest.approx(brute_force_map(run), abs=1e-6)
    assert json.loads((run / "summary.json").read_text())["mAP"] == summary["mAP"]
    per_class = _read_csv(run / "per_class_map.csv")
    assert {row["class"] for row in per_class} == {"astronaut", "coffee", "chelsea", "rocket"}
    assert np.mean([float(r["mAP"]) for r in per_class]) == pytest.approx(summary["class_mAP"], abs=1e-5)
    assert len(_read_csv(run / "per_query_ap.csv")) == 12
    descriptors = np.load(run / "descriptors.npy")
    assert descriptors.shape == (12, 1280)
    np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1.0, rtol=1e-5)
    assert (run / "csv").is_dir()


def test_descriptors_identical_for_batch_size_one_and_batched(compose_eval):
    cfg = compose_eval(*TINY_BUILTIN, "dataset.image_size=96", "extraction.max_size=96")
    dataset = instantiate(cfg.dataset)
    network = RetrievalNetwork(Backbone("tf_efficientnet_lite0"), {"gem": GeM()}, scales=(1.0, 0.75))
    described = {batch_size: ExtractionEngine(network, batch_size=batch_size).extract(
        dataset.records, ImageSource(max_size=96)).descriptors["gem"] for batch_size in (1, 8)}
    np.testing.assert_allclose(described[1], described[8], atol=1e-5, rtol=0)


def test_corrupt_and_truncated_images_are_skipped_and_reported(compose_eval, tmp_path):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(root / label / f"{i}.jpg")
    (root / "a" / "corrupt.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    data = (root / "b" / "0.jpg").read_bytes()
    (root / "b" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    summary = evaluate(compose_eval("dataset=folder", f"dataset.root={root}", "extraction.max_size=64"))
    skipped = {entry["path"].split("/")[-1] for entry in summary["skipped"]}
    assert skipped == {"corrupt.jpg", "truncated.jpg"}
    assert summary["counts"]["images"] == 8 and summary["counts"]["described"] == 6
    assert summary["counts"]["evaluated_queries"] == 6


def test_singleton_class_is_excluded_and_reported(compose_eval, tmp_path):
    root = tmp_path / "images"
    for label, count in (("a", 2), ("b", 2), ("alone", 1)):
        (root / label).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (32, 32), (40 * i, 80, 120)).save(root / label / f"{i}.png")
    summary = evaluate(compose_eval("dataset=folder", f"dataset.root={root}", "extraction.max_size=32"))
    assert summary["counts"]["queries"] == 5 and summary["counts"]["evaluated_queries"] == 4
    assert [p.split("/")[-2] for p in summary["excluded_queries"]] == ["alone"]


def test_bad_config_values_fail_at_start_up(compose_eval, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        evaluate(compose_eval("dataset=folder", f"dataset.root={tmp_path / 'nowhere'}"))
    with pytest.raises(ConfigError, match="max_size"):
        evaluate(compose_eval(*TINY_BUILTIN, "extraction.max_size=abc"))
    with pytest.raises(ConfigError, match="GeM"):
        evaluate(compose_eval(*TINY_BUILTIN, "pooling.p=-1"))
    with pytest.raises(ConfigError, match="root"):
        evaluate(compose_eval("dataset=folder"))


def test_fast_dev_run_reports_the_images_it_did_not_extract(compose_eval):
    summary = evaluate(compose_eval(*TINY_BUILTIN, "debug=fast", "extraction.batch_size=4"))
    described = summary["counts"]["described"]
    assert 0 < described <= 4  # one batch: the first size bucket (3 astronaut images)
    assert sum("not extracted" in entry["reason"] for entry in summary["skipped"]) == 12 - described


def test_heritage_wild_loads_and_evaluates_every_image(compose_eval, heritage_root, tmp_path):
    summary = evaluate(compose_eval("dataset=heritage_wild", "extraction.max_size=224"))
    assert summary["counts"] == {"images": 40, "described": 40, "queries": 24, "evaluated_queries": 24,
                                 "database": 40, "classes": 8, "skipped": 0}
    assert summary["skipped"] == [] and 0.1 < summary["mAP"] < 1.0
    assert summary["mAP"] == pytest.approx(brute_force_map(tmp_path / "run"), abs=1e-6)


def test_pacs_cross_domain_split(compose_eval, pacs_root, tmp_path):
    summary = evaluate(compose_eval("dataset=pacs_sketch_to_photo", "dataset.domains=[photo,sketch]",
                                    "extraction.max_size=64", "extraction.batch_size=64"))
    assert summary["counts"]["queries"] == 983 and summary["counts"]["database"] == 420
    assert summary["mAP"] > 1 / 7  # better than chance over 7 classes
    assert summary["mAP"] == pytest.approx(brute_force_map(tmp_path / "run"), abs=1e-6)


def test_report_figures_and_tag_correlations(compose_eval, tmp_path):
    evaluate(compose_eval(*TINY_BUILTIN, "evaluation.report=true"))
    report = tmp_path / "run" / "report"
    for name in ("figure4_best.png", "figure4_worst.png", "per_class_map.png", "comparison.md"):
        assert (report / name).stat().st_size > 0
    # the built-in benchmark tags every image with variation strengths: they are correlated with per-class mAP
    assert (report / "correlations.csv").read_text().splitlines()[0].startswith("variation,descriptor")
