"""Revisited datasets as RetrievalDatasets: query crops through the loader, clear start-up failure, protocol."""

import pickle

import numpy as np
import pytest
import torch

from hetretrieval.data.images import CROP_KEY, clip_box, load_image, parse_box, read_image_size, save_image
from hetretrieval.data.revisitop import revisitop_dataset
from hetretrieval.errors import DataError
from hetretrieval.extraction.batching import ImagePlan, ImageSource
from hetretrieval.extraction.engine import ExtractionEngine
from hetretrieval.metrics.revisited import evaluate_revisited, rank_database, revisited_summary
from hetretrieval.models.local.orb import OrbExtractor


def _write_gnd(root, imlist, qimlist, gnd):
    (root / "gnd_roxford5k.pkl").write_bytes(pickle.dumps({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}))


@pytest.fixture
def tiny_root(tmp_path):
    _write_gnd(tmp_path, ["a", "b", "c"], ["q"],
               [{"bbx": [2.0, 4.0, 12.4, 10.0], "easy": np.array([1]), "hard": np.array([0]), "junk": np.array([2])}])
    (tmp_path / "jpg").mkdir()
    for name in ("a", "b", "c", "q"):
        save_image(torch.rand(3, 20, 30), tmp_path / "jpg" / f"{name}.jpg")
    return tmp_path


def test_box_helpers():
    assert parse_box("1,2,3.5,4") == (1.0, 2.0, 3.5, 4.0) and parse_box("") is None
    assert clip_box(10, 20, (-3, 2.6, 25, 8)) == (0, 3, 20, 8)
    with pytest.raises(ValueError):
        clip_box(10, 20, (30, 0, 40, 5))


def test_load_image_crops_before_resizing(tmp_path):
    image = torch.zeros(3, 20, 40)
    image[:, 5:15, 10:30] = 1.0
    save_image(image, tmp_path / "x.png")
    crop = load_image(tmp_path / "x.png", None, box=(10, 5, 30, 15))
    assert crop.shape == (3, 10, 20) and crop.min() == 1.0
    assert load_image(tmp_path / "x.png", 10, box=(10, 5, 30, 15)).shape == (3, 5, 10)
    assert read_image_size(tmp_path / "x.png", (10, 5, 30, 15)) == (10, 20)


def test_revisitop_dataset_and_cropped_queries(tiny_root):
    dataset = revisitop_dataset(tiny_root, "roxford5k", crop_queries=True)
    assert dataset.query_ids.tolist() == [0] and dataset.database_ids.tolist() == [1, 2, 3]
    assert dataset.records[0].metadata[CROP_KEY] == "2.0,4.0,12.4,10.0"
    plan = ImagePlan.scan(dataset.records, ImageSource(max_size=None))
    assert plan.shapes == [(6, 10), (20, 30), (20, 30), (20, 30)]
    batches = list(ExtractionEngine(None, {"orb": OrbExtractor()}, batch_size=16).loader(dataset.records, plan))
    assert sorted(tuple(b["images"].shape[-2:]) for b in batches) == [(6, 10), (20, 30)]
    assert CROP_KEY not in revisitop_dataset(tiny_root, "roxford5k", crop_queries=False).records[0].metadata


def test_missing_images_fail_in_one_line(tiny_root):
    (tiny_root / "jpg" / "b.jpg").unlink()
    with pytest.raises(DataError, match=r"1 of the roxford5k images are missing .* extract .*oxbuild") as error:
        revisitop_dataset(tiny_root, "roxford5k")
    assert "\n" not in str(error.value)


def test_rank_database_feeds_the_official_protocol(tiny_root):
    dataset = revisitop_dataset(tiny_root, "roxford5k")
    database = np.eye(3, dtype=np.float32)
    query = np.array([[0.1, 0.9, 0.3]], dtype=np.float32)  # ranking b (easy), c (junk), a (hard)
    ranking = rank_database(query, database)
    assert ranking.tolist() == [[1, 2, 0]]
    summary = revisited_summary(evaluate_revisited(ranking, dataset.ground_truth.queries, ks=(1,)))
    # junk is removed before ranks count: easy b first; hard a first once b (easy = junk there) and c go
    assert summary == {f"{m}_{p}": 1.0 for p in ("easy", "medium", "hard") for m in ("mAP", "mP@1")}
