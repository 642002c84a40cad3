"""LocalFeatures validation, the one-file `.npz` round trip, and ORB edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hetretrieval.errors import ConfigError, DataError
from hetretrieval.models.local.features import LocalFeatures, load_local_features, save_local_features
from hetretrieval.models.local.orb import OrbExtractor, extract_orb


def random_features(n: int, seed: int, binary: bool) -> LocalFeatures:
    rng = np.random.default_rng(seed)
    if binary:
        descriptors = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    else:
        descriptors = rng.normal(size=(n, 8)).astype(np.float32)
        descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    return LocalFeatures(
        keypoints=rng.uniform(0, 100, (n, 2)).astype(np.float32),
        descriptors=descriptors,
        scores=rng.random(n).astype(np.float32),
        image_size=(100 + seed, 120),
    )


@pytest.mark.parametrize("binary", [False, True])
def test_save_load_round_trip_keeps_every_image(tmp_path, binary):
    features = [random_features(n, seed, binary) for seed, n in enumerate([5, 0, 12])]
    save_local_features(tmp_path / "features.npz", features)
    loaded = load_local_features(tmp_path / "features.npz")
    assert len(loaded) == 3
    for original, restored in zip(features, loaded, strict=True):
        assert restored.image_size == original.image_size and restored.is_binary == binary
        for field in ("keypoints", "descriptors", "scores"):
            np.testing.assert_array_equal(getattr(restored, field), getattr(original, field))
            assert getattr(restored, field).dtype == getattr(original, field).dtype


def test_save_rejects_mixed_descriptors(tmp_path):
    with pytest.raises(ValueError, match="descriptor"):
        save_local_features(
            tmp_path / "mixed.npz", [random_features(3, 0, True), random_features(3, 1, False)]
        )


def test_load_reports_missing_and_malformed_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_local_features(tmp_path / "absent.npz")
    np.savez(tmp_path / "partial.npz", keypoints=np.zeros((2, 2), np.float32))
    with pytest.raises(DataError, match="malformed"):
        load_local_features(tmp_path / "partial.npz")


def test_inconsistent_shapes_are_rejected():
    with pytest.raises(ValueError, match="scores"):
        LocalFeatures(
            np.zeros((3, 2), np.float32), np.zeros((3, 32), np.uint8), np.zeros(2, np.float32), (4, 4)
        )
    with pytest.raises(ValueError, match="descriptors"):
        LocalFeatures(
            np.zeros((3, 2), np.float32), np.zeros((3, 8), np.float64), np.zeros(3, np.float32), (4, 4)
        )


def test_orb_on_a_flat_image_finds_nothing():
    features = extract_orb(np.full((64, 80, 3), 128, dtype=np.uint8))
    assert len(features) == 0 and features.descriptors.shape == (0, 32) and features.image_size == (64, 80)


def test_orb_validates_inputs_and_configuration():
    textured = np.random.default_rng(0).integers(0, 256, (120, 160), dtype=np.uint8)
    features = OrbExtractor(n_features=50)(textured)
    assert 0 < len(features) <= 50 and features.is_binary
    assert ((features.keypoints >= 0) & (features.keypoints < [160, 120])).all()
    with pytest.raises(ConfigError):
        extract_orb(textured, scale_factor=1.0)
    with pytest.raises(ValueError):
        extract_orb(torch.rand(1, 32, 32))
