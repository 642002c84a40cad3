"""Issue 10, data layer: relative paths that outlive the working directory, the grid of a run whose images are
gone, and the real data going through the stricter builders and unpickler without a warning."""

import logging

from PIL import Image

from hetretrieval.analysis.retrieval_figures import GridRow, draw_grid
from hetretrieval.data import revisitop
from hetretrieval.data.datasets import csv_manifest, domain_folder, labelled_folder
from hetretrieval.data.revisitop import load_revisitop


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(path)


def test_relative_dataset_paths_are_stored_absolute(tmp_path, monkeypatch):
    for name in ("data/a/1.png", "data/b/2.png", "pacs/photo/a/3.png", "extra/x.png"):
        _image(tmp_path / name)
    (tmp_path / "data" / "labels.csv").write_text("filename,label\na/1.png,a\nb/2.png,b\n")
    (tmp_path / "linked").symlink_to(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    datasets = [labelled_folder("data", distractors="extra"), domain_folder("pacs", distractors="./extra"),
                csv_manifest("data/labels.csv", distractors="extra"), labelled_folder("linked")]
    monkeypatch.chdir(tmp_path / "extra")  # analysed from another directory
    for dataset in datasets:
        assert all(r.path.is_absolute() and r.path.is_file() for r in dataset.records)
    assert datasets[0].records[0].path == tmp_path / "data" / "a" / "1.png"
    assert datasets[3].records[0].path == tmp_path / "linked" / "a" / "1.png"  # the link kept, not resolved


def test_grid_of_missing_images_says_so(tmp_path, caplog):
    present = tmp_path / "q.png"
    _image(present)
    rows = [GridRow(present, "c0", 0.5, (tmp_path / "gone1.jpg", present, tmp_path / "gone2.jpg"),
                    (True, False, True))]
    with caplog.at_level(logging.WARNING):
        assert draw_grid(rows, tmp_path / "grid.png").is_file()
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "2 of the 4 grid images could not be read" in warning and "gone1.jpg: file not found" in warning


def test_real_data_loads_without_warnings(pacs_root, heritage_root, caplog):
    with caplog.at_level(logging.WARNING):
        pacs = domain_folder(pacs_root)
        heritage = csv_manifest(heritage_root / "labels.csv", label_column="landmark",
                                distractors=heritage_root)
    assert not caplog.records
    assert len(pacs) == 515 + 589 + 420 + 983 and len(heritage) == 40
    assert sum(label is not None for label in heritage.labels) == 24


def test_real_ground_truth_needs_no_call(revisitop_root, monkeypatch):
    calls = []
    monkeypatch.setattr(revisitop._GroundTruthUnpickler, "charge", lambda self, cost, what: calls.append(what))
    for name, n_db in (("roxford5k", 4993), ("rparis6k", 6322)):
        ground_truth = load_revisitop(revisitop_root, name)
        assert len(ground_truth.imlist) == n_db and len(ground_truth.queries) == 70
    assert calls == []
