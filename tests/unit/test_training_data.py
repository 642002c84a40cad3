"""Training data pieces: held-out split, square crops, numbered batches, variation augmentation, val metrics."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from hetretrieval.data.datasets import ImageRecord, make_dataset
from hetretrieval.data.images import square_crop
from hetretrieval.errors import ConfigError
from hetretrieval.training.augmentation import VariationAugmentation
from hetretrieval.training.datamodule import NumberedBatches, holdout_split
from hetretrieval.training.module import validation_metrics


def _records(per_stratum: int = 5):
    return [ImageRecord(Path(f"{d}/{c}/{i}.png"), c, {"domain": d})
            for d in ("photo", "art") for c in ("dog", "cat") for i in range(per_stratum)]


def test_holdout_split_is_stratified_disjoint_and_seeded():
    dataset = make_dataset("toy", _records())
    train, val = holdout_split(dataset, 0.2, seed=3)
    assert Counter((r.label, r.metadata["domain"]) for r in val.records) == {
        ("dog", "photo"): 1, ("cat", "photo"): 1, ("dog", "art"): 1, ("cat", "art"): 1}
    assert {r.path for r in train.records}.isdisjoint(r.path for r in val.records)
    assert len(train) + len(val) == len(dataset)
    assert holdout_split(dataset, 0.2, seed=3)[1].records == val.records
    assert holdout_split(dataset, 0.2, seed=4)[1].records != val.records


def test_holdout_split_applies_the_validation_protocol_and_checks_the_fraction():
    dataset = make_dataset("toy", _records())
    _, val = holdout_split(dataset, 0.4, query={"domain": ["art"]}, database={"domain": ["photo"]})
    assert {val.records[i].metadata["domain"] for i in val.query_ids} == {"art"}
    assert {val.records[i].metadata["domain"] for i in val.database_ids} == {"photo"}
    with pytest.raises(ConfigError):
        holdout_split(dataset, 1.0)


def test_square_crop_centre_and_random_positions():
    image = torch.arange(2 * 4, dtype=torch.float32).view(1, 2, 4).expand(3, 2, 4) / 8
    centre = square_crop(image, 2)
    torch.testing.assert_close(centre, image[:, :, 1:3])  # no resize needed: shorter side is already 2
    lefts = {square_crop(image, 2, torch.Generator().manual_seed(s))[0, 0, 0].item() for s in range(20)}
    assert lefts == {0.0, 1 / 8, 2 / 8}
    assert square_crop(torch.rand(3, 50, 80), 32).shape == (3, 32, 32)


def test_numbered_batches_number_every_draw_once():
    batches = list(NumberedBatches([[5, 5, 1], [2, 0]]))
    assert batches == [[(0, 5), (1, 5), (2, 1)], [(3, 2), (4, 0)]]


def test_augmentation_is_reproducible_per_draw_and_identity_at_probability_zero():
    images = torch.rand(3, 3, 32, 32)
    augment = VariationAugmentation({"grayscale": 0.5, "rotation": 0.5, "noise": 0.5}, seed=1)
    torch.testing.assert_close(augment(images, draw=7), augment(images, draw=7))
    assert not torch.equal(augment(images, draw=7), augment(images, draw=8))
    assert torch.equal(VariationAugmentation({"sepia": 0.0})(images, draw=0), images)
    always_gray = VariationAugmentation({"grayscale": 1.0}, strength_range=(1.0, 1.0))(images, draw=0)
    torch.testing.assert_close(always_gray[:, 0], always_gray[:, 2])
    with pytest.raises(ConfigError):
        VariationAugmentation({"sepiaa": 0.5})
    with pytest.raises(ConfigError):
        VariationAugmentation({"sepia": 1.5})


def test_validation_metrics_break_map_down_per_domain_pair():
    # One dog and one cat per domain; the art cat is nearer the photo dog than the photo cat.
    records = [ImageRecord(Path(f"{i}.png"), c, {"domain": d})
               for i, (d, c) in enumerate([("photo", "dog"), ("photo", "cat"), ("art", "dog"), ("art", "cat")])]
    dataset = make_dataset("toy", records)
    descriptors = np.array([[1, 0], [0.6, 0.8], [1, 0], [0.96, 0.28]], dtype=np.float32)
    metrics = validation_metrics(descriptors, np.ones(4, bool), dataset, ks=(1,))
    assert metrics["mAP/art->photo"] == pytest.approx((1.0 + 0.5) / 2)  # art cat finds the photo cat 2nd
    assert metrics["mAP/photo->art"] == pytest.approx(1.0)
    assert "mAP/art->art" not in metrics  # no positive within a domain
    assert set(metrics) >= {"mAP", "class_mAP", "mP@1", "class_mAP/dog", "class_mAP/cat"}
