"""Pooling functions against brute-force loops and hand-computed region grids."""

import itertools

import pytest
import torch

from hetretrieval.models.pooling import functional as PF
from hetretrieval.models.pooling.heads import MAC, RMAC, GeM, SPoC


@pytest.fixture
def feature_map():
    return torch.rand(2, 5, 7, 9, generator=torch.Generator().manual_seed(0))


def test_mac_spoc_gem_brute_force(feature_map):
    b, c, h, w = feature_map.shape
    for i, j in itertools.product(range(b), range(c)):
        values = [feature_map[i, j, y, x].item() for y in range(h) for x in range(w)]
        assert PF.mac(feature_map)[i, j].item() == pytest.approx(max(values))
        assert PF.spoc(feature_map)[i, j].item() == pytest.approx(sum(values) / len(values), rel=1e-5)
        cubes = sum(max(v, 1e-6) ** 3 for v in values) / len(values)
        assert PF.gem(feature_map, 3.0)[i, j].item() == pytest.approx(cubes ** (1 / 3), rel=1e-5)


def test_gem_limits(feature_map):
    torch.testing.assert_close(PF.gem(feature_map, 1.0), PF.spoc(feature_map), rtol=1e-5, atol=1e-6)
    # max * n^(-1/p) <= gem_p <= max, so GeM tends to MAC as p grows
    x, n, p = feature_map.double(), feature_map.shape[-1] * feature_map.shape[-2], 200.0
    assert torch.all(PF.gem(x, p) <= PF.mac(x) + 1e-12)
    assert torch.all(PF.gem(x, p) >= PF.mac(x) * n ** (-1 / p) - 1e-12)


def test_rmac_regions_square_hand_computed():
    # 10x10, L=3: level 1 side 10 (1 region); level 2 side 6 at 0, 4 (2x2); level 3 side 5 at 0, 2, 5 (3x3)
    regions = PF.rmac_regions(10, 10)
    assert regions[0] == (0, 0, 10, 10)
    assert sorted(regions[1:5]) == [(0, 0, 6, 6), (0, 4, 6, 6), (4, 0, 6, 6), (4, 4, 6, 6)]
    starts = (0, 2, 5)
    assert sorted((top, left) for top, left, _, _ in regions[5:]) == [(t, x) for t in starts for x in starts]
    assert len(regions) == 14


def test_rmac_regions_landscape_overlap():
    # 7x10: extra regions along the width chosen for ~40% overlap -> level 1 has 2 regions of side 7
    regions = PF.rmac_regions(7, 10)
    level1 = [r for r in regions if r[2] == 7]
    assert level1 == [(0, 0, 7, 7), (0, 3, 7, 7)]
    for top, left, h, w in regions:
        assert 0 <= top and top + h <= 7 and 0 <= left and left + w <= 10


def test_rmac_brute_force(feature_map):
    expected = torch.zeros(feature_map.shape[:2])
    for top, left, h, w in PF.rmac_regions(7, 9):
        region = feature_map[:, :, top : top + h, left : left + w].amax(dim=(-2, -1))
        expected += region / region.norm(dim=1, keepdim=True)
    torch.testing.assert_close(PF.rmac(feature_map), expected / expected.norm(dim=1, keepdim=True))


@pytest.mark.parametrize("head", [MAC(), SPoC(), GeM(), RMAC()])
def test_heads_are_l2_normalised(head, feature_map):
    out = head(feature_map)
    assert out.shape == (2, 5)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def test_gem_p_is_learnable():
    head = GeM(p=3.0)
    head(torch.rand(1, 4, 3, 3)).sum().backward()
    assert head.p.grad is not None


def test_multiscale_aggregation_is_normalised_mean():
    a, b = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]])
    expected = torch.tensor([[0.6 + 1.0, 0.8]]) / torch.tensor([[1.6, 0.8]]).norm()
    torch.testing.assert_close(PF.aggregate_scales([a, b]), expected)
