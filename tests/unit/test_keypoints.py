"""Receptive fields (known analytic cases), feature locations, keypoint selection, the pyramid, PCA."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from hetretrieval.errors import ConfigError
from hetretrieval.models.local.attention import FeatureNormScorer
from hetretrieval.models.local.features import LocalFeatures
from hetretrieval.models.local.keypoints import (
    ReceptiveField,
    extract_local_features,
    feature_locations,
    receptive_field,
    select_keypoints,
)


def isotropic(size, stride, offset):
    return ReceptiveField(size=(size, size), stride=(stride, stride), offset=(offset, offset))


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        # one conv: size k, stride s, unit 0 centred at (k - 1) / 2 - padding
        (nn.Conv2d(3, 4, kernel_size=5, stride=2, padding=1), isotropic(5, 2, 1.0)),
        (nn.Conv2d(3, 4, kernel_size=4, stride=1, padding=0), isotropic(4, 1, 1.5)),
        # stack: size 1 + sum (k_l - 1) * jump_l = 1 + 2 + 2*2 + 1*4 = 11, jump prod s_l = 8,
        # centre sum ((k_l - 1) / 2 - p_l) * jump_l = 0 + 0 + 0.5 * 4 = 2
        (
            nn.Sequential(
                nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 2, 1), nn.Conv2d(4, 4, 2, 2, 0)
            ),
            isotropic(11, 8, 2.0),
        ),
        # conv + max pool (resnet stem): 7 + (3 - 1) * 2 = 11, jump 4, centred on pixel 0
        (nn.Sequential(nn.Conv2d(3, 4, 7, 2, 3), nn.MaxPool2d(3, 2, 1)), isotropic(11, 4, 0.0)),
        # dilated conv: hull 1 + (3 - 1) * 2 = 5
        (nn.Conv2d(3, 4, kernel_size=3, dilation=2, padding=2), isotropic(5, 1, 0.0)),
    ],
)
def test_receptive_field_known_cases(module, expected):
    assert receptive_field(module, probe_size=64) == expected


def test_receptive_field_anisotropic_kernel():
    rf = receptive_field(nn.Conv2d(3, 2, kernel_size=(3, 7), stride=(1, 2)), probe_size=64)
    assert rf == ReceptiveField(size=(7, 3), stride=(2, 1), offset=(3.0, 1.0))


def test_receptive_field_resnet50_layer3_matches_published_value():
    """267 px, stride 16 for torchvision-style resnet50 layer3 (stride on the 3x3 conv), as tabulated in
    https://gist.github.com/samson-wang/a6073c18f2adf16e0ab5fb95b53db3e6 (layer4: 427)."""
    layer3 = timm.create_model("resnet50", pretrained=False, features_only=True, out_indices=(3,))
    assert receptive_field(layer3, probe_size=320) == isotropic(267, 16, 0.0)


def test_receptive_field_larger_than_probe_is_a_config_error():
    with pytest.raises(ConfigError, match="increase probe_size"):
        receptive_field(nn.Conv2d(3, 1, kernel_size=9, padding=4), probe_size=10)
    global_gate = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1))
    with pytest.raises(ConfigError):
        receptive_field(nn.Sequential(nn.Conv2d(3, 4, 3), _Gated(global_gate)), probe_size=32)


class _Gated(nn.Module):
    """Squeeze-excitation-like: features scaled by a global gate, so every unit sees the whole image."""

    def __init__(self, gate):
        super().__init__()
        self.gate = gate

    def forward(self, x):
        return x * self.gate(x[:, :3]).mean(1, keepdim=True)


def test_feature_locations_row_major_xy():
    rf = ReceptiveField(size=(11, 11), stride=(4, 8), offset=(1.5, -2.0))
    locations = feature_locations(2, 3, rf)
    expected = torch.tensor([[1.5 + 4 * j, -2.0 + 8 * i] for i in range(2) for j in range(3)])
    torch.testing.assert_close(locations, expected)


def test_select_keypoints_top_n_and_threshold():
    features = torch.arange(2 * 2 * 3, dtype=torch.float32).view(2, 2, 3)
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 0.8]])
    rf = isotropic(3, 2, 0.0)
    locations, descriptors, kept = select_keypoints(features, scores, rf, top_n=3)
    torch.testing.assert_close(kept, torch.tensor([0.9, 0.8, 0.7]))
    torch.testing.assert_close(locations, torch.tensor([[2.0, 0.0], [4.0, 2.0], [0.0, 2.0]]))
    torch.testing.assert_close(descriptors, torch.tensor([[1.0, 7.0], [5.0, 11.0], [3.0, 9.0]]))
    _, _, kept = select_keypoints(features, scores, rf, top_n=10, threshold=0.5)
    torch.testing.assert_close(kept, torch.tensor([0.9, 0.8, 0.7, 0.5]))
    _, _, kept = select_keypoints(features, scores, rf, top_n=10, threshold=2.0)
    assert len(kept) == 0


def bright_square_features(image):
    """Stride-2 2x2 average pooling (receptive field 2, offset 0.5): one channel map of brightness."""
    return nn.functional.avg_pool2d(image, 2).mean(1, keepdim=True).repeat(1, 4, 1, 1)


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_pyramid_location_maps_back_to_original_coordinates(scale):
    image = torch.zeros(3, 40, 60)
    image[:, 16:24, 28:36] = 1.0  # bright 8x8 square centred at (x, y) = (31.5, 19.5)
    rf = receptive_field(nn.AvgPool2d(2), probe_size=16)
    assert rf == isotropic(2, 2, 0.5)
    found = extract_local_features(
        bright_square_features, image, scorer=FeatureNormScorer(), rf=rf, scales=[scale], top_n=500
    )
    assert isinstance(found, LocalFeatures)
    assert found.image_size == (40, 60)
    best = found.scores == found.scores.max()
    centre = found.keypoints[best].mean(0)
    assert centre == pytest.approx([31.5, 19.5], abs=0.01)
    assert found.keypoints[:, 0].min() >= 0 and found.keypoints[:, 0].max() <= 59


def test_pyramid_keeps_global_top_n_with_unit_descriptors():
    image = torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(0))
    rf = isotropic(2, 2, 0.5)
    found = extract_local_features(
        bright_square_features, image, scorer=FeatureNormScorer(), rf=rf, scales=[0.5, 1.0, 2.0], top_n=25
    )
    assert len(found) == 25
    assert (found.scores[:-1] >= found.scores[1:]).all()
    assert found.descriptors.dtype.name == "float32"
    torch.testing.assert_close(torch.from_numpy(found.descriptors).norm(dim=1), torch.ones(25))
