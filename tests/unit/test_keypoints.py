"""Receptive fields (known analytic cases), feature locations, keypoint selection, the pyramid, PCA."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from timm.layers import create_conv2d
from torch import nn

from hetretrieval.errors import ConfigError
from hetretrieval.models.backbones import Backbone
from hetretrieval.models.local.attention import FeatureNormScorer
from hetretrieval.models.local.features import LocalFeatures
from hetretrieval.models.local.keypoints import (
    ReceptiveField,
    ReceptiveFieldBySize,
    extract_local_features,
    feature_locations,
    receptive_field,
    select_keypoints,
)
from hetretrieval.models.local.pipeline import DelfExtractor


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


def _tf_same_offset(length, layers):
    """Unit 0's centre from timm's TF-"same" rule, written out: a (kernel k, stride s) layer on a length-x input
    pads `max((ceil(x / s) - 1) * s + k - x, 0)` pixels, `floor(pad / 2)` before, and outputs `ceil(x / s)`."""
    offset, jump = 0.0, 1
    for k, s in layers:
        pad_before = max((math.ceil(length / s) - 1) * s + k - length, 0) // 2
        offset += ((k - 1) / 2 - pad_before) * jump
        length, jump = math.ceil(length / s), jump * s
    return offset


def test_tf_same_offsets_follow_timm_padding_for_every_input_size():
    layers = [(3, 2), (3, 1), (5, 2), (1, 2)]
    module = nn.Sequential(*(create_conv2d(2, 2, k, stride=s, padding="same") for k, s in layers))
    by_size = ReceptiveFieldBySize(module, in_channels=2, probe_size=48)
    assert by_size.base.stride == (8, 8) and by_size.base.size == (15, 15)
    offsets = {_tf_same_offset(n, layers) for n in range(40, 57)}
    assert len(offsets) > 1  # the offset does depend on the size here
    for height, width in [(40, 41), (43, 50), (29, 33), (7, 12), (56, 45), (101, 99)]:
        rf = by_size(height, width)
        assert rf.offset == (_tf_same_offset(width, layers), _tf_same_offset(height, layers)), (height, width)
        assert (rf.size, rf.stride) == (by_size.base.size, by_size.base.stride)
    assert receptive_field(module, in_channels=2, probe_size=48) == by_size.base


def _input_gradient_centre(module, length, axis, thin=16):
    """Centre of the central unit's support along `axis`, from the input gradient of a linearised copy
    (activations replaced by identities: no dead unit can hide part of the support)."""
    linear = copy.deepcopy(module).float().eval()
    for name, child in list(linear.named_modules()):
        if isinstance(child, nn.ReLU6 | nn.ReLU):
            parent, _, attribute = name.rpartition(".")
            setattr(linear.get_submodule(parent), attribute, nn.Identity())
    shape = [1, 3, thin, thin]
    shape[axis] = length
    image = torch.rand(shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    output = linear(image)
    unit = output.shape[axis] // 2
    output.select(axis, unit).sum().backward()
    support = image.grad.abs().sum(dim=[d for d in range(4) if d != 4 + axis]).nonzero().flatten()
    return unit, (support[0].item() + support[-1].item()) / 2


@pytest.fixture(scope="module")
def lite0_delf():
    return DelfExtractor(Backbone("tf_efficientnet_lite0", pretrained=False), stage=3, scales=[1.0])


@pytest.mark.parametrize(("length", "axis"), [(401, -1), (458, -1), (507, -2)])
def test_delf_offsets_on_tf_efficientnet_lite0_match_an_input_gradient_probe(lite0_delf, length, axis):
    assert length % 16 != 0
    rf = lite0_delf.receptive_field_at(length, length)
    index = 0 if axis == -1 else 1
    unit, centre = _input_gradient_centre(lite0_delf.features, length, axis)
    assert rf.offset[index] + rf.stride[index] * unit == centre
    assert rf.offset[index] == (length - 1) % 16  # 15 px at 512 (the single probe's value), 0 at 497, ...


def test_pyramid_locates_each_scale_by_the_field_of_its_own_input_size():
    image = torch.rand(3, 30, 50, generator=torch.Generator().manual_seed(0))
    sizes = []

    def field_at(height, width):
        sizes.append((height, width))
        return ReceptiveField(size=(2, 2), stride=(2, 2), offset=(float(width), float(height)))

    found = extract_local_features(bright_square_features, image, FeatureNormScorer(), field_at,
                                   scales=[0.5, 1.0], top_n=1000)
    assert sizes == [(15, 25), (30, 50)]
    # unit (0, 0) of a scale sits at (w', h'), mapped back by (x' + 0.5) * 50 / w' - 0.5: (50.5, 30.5) from the
    # half scale, (50, 30) from the full one
    corners = {tuple(point) for point in found.keypoints.tolist()} & {(50.5, 30.5), (50.0, 30.0)}
    assert corners == {(50.5, 30.5), (50.0, 30.0)}


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
