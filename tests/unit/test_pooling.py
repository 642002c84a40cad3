"""Pooling functions against brute-force loops and hand-computed region grids."""

import itertools
import math

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


def test_gem_clamps_zeros_to_eps_with_finite_gradients():
    zeros = torch.zeros(1, 2, 3, 3, requires_grad=True)
    torch.testing.assert_close(PF.gem(zeros, 3.0, eps=1e-6), torch.full((1, 2), 1e-6), rtol=1e-4, atol=0)
    p = torch.tensor(3.0, requires_grad=True)
    PF.gem(zeros, p, eps=1e-6).sum().backward()  # the learnable p's gradient (log of the clamped map) too
    assert torch.isfinite(zeros.grad).all() and torch.isfinite(p.grad)


def test_resize_to_scale_rounds_each_side():
    images = torch.rand(2, 3, 10, 15)
    assert PF.resize_to_scale(images, 1.0) is images
    assert PF.resize_to_scale(images, 0.75).shape == (2, 3, 8, 11)  # 7.5 -> 8, 11.25 -> 11
    assert PF.resize_to_scale(images, 0.01).shape == (2, 3, 1, 1)  # at least one pixel


def test_heads_refuse_bad_settings_and_rmac_uses_its_overlap():
    from hetretrieval.errors import ConfigError

    for bad in (lambda: GeM(p=0.0), lambda: GeM(eps=0.0), lambda: RMAC(levels=0), lambda: RMAC(overlap=1.0),
                lambda: RMAC(overlap=-0.1)):
        with pytest.raises(ConfigError):
            bad()
    assert GeM(p=1e-3) and RMAC(levels=1, overlap=0.0)
    # 5x12: 3, 4, 5 level-1 regions overlap 30%, 53%, 65%: 40% takes 3, 60% takes 5
    assert len(PF.rmac_regions(5, 12, levels=1)) == 3 and len(PF.rmac_regions(5, 12, 1, overlap=0.6)) == 5
    x = torch.rand(2, 4, 5, 12, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(RMAC(overlap=0.6)(x), PF.rmac(x, 3, 0.6))
    assert not torch.allclose(RMAC(overlap=0.6)(x), RMAC()(x))


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


def published_rmac_grid(height, width, levels=3, overlap=0.4):
    """Tolias et al.'s region grid transcribed from the published formula, in float64, independently of
    `rmac_regions`: the overlap of `n` level-1 regions along the long side is `(w^2 - w * b) / w^2` with `b =
    (long - w) / (n - 1)`, the extra count the `n - 1` whose overlap is nearest `overlap`; level l has side
    `wl = floor(2w / (l + 1))` and centres `floor(wl2 + i * b) - wl2` with `wl2 = floor(wl / 2 - 1)` and
    `b = (length - wl) / (l + extra - 1)` (0 for a single region). Two float64 guards stand in for exact
    arithmetic: a floor reads `i * b` within 1e-9 of an integer as that integer (exact values are multiples of
    1/6 apart), and overlaps within 1e-12 of the best are a tie, won by the smaller count (the documented rule).
    Levels of side 0 are left out."""
    w, long = min(height, width), max(height, width)
    extra = 0
    if long > w:
        errors = [abs((w * w - w * (long - w) / (n - 1)) / (w * w) - overlap) for n in range(2, 8)]
        extra = next(i for i, e in enumerate(errors) if e <= min(errors) + 1e-12) + 1
    extra_h, extra_w = (extra, 0) if height > width else (0, extra)
    boxes = []
    for level in range(1, levels + 1):
        wl = math.floor(2 * w / (level + 1))
        if wl < 1:
            continue
        wl2 = math.floor(wl / 2 - 1)
        starts = []
        for length, count in ((height, level + extra_h), (width, level + extra_w)):
            b = 0.0 if count == 1 else (length - wl) / (count - 1)
            starts.append([math.floor(wl2 + i * b + 1e-9) - wl2 for i in range(count)])
        boxes.extend((top, left, wl, wl) for top in starts[0] for left in starts[1])
    return boxes


def test_rmac_grid_matches_the_published_formula_for_every_size_up_to_64():
    mismatches = [(h, w) for h in range(1, 65) for w in range(1, 65)
                  if PF.rmac_regions(h, w) != published_rmac_grid(h, w)]
    assert mismatches == []
    # 1x9: levels 2 and 3 have side 0; level 1 has 1 + 6 regions of side 1 at floor(i * 8 / 6)
    assert PF.rmac_regions(1, 9) == [(0, i, 1, 1) for i in (0, 1, 2, 4, 5, 6, 8)]
    for height, width in ((64, 3), (40, 7), (1, 64)):  # tall maps and a one-row map
        for top, left, h, w in PF.rmac_regions(height, width):
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width


def test_rmac_starts_are_exact_where_float_products_fall_short():
    # 7 * ((71 - 10) / 7) = 60.999... in floating point: the exact start is 61
    assert PF._region_starts(71, 10, 8)[-1] == 61
    # 62x2, level 2 (side 1, 8 rows of regions): 7 * (61 / 7) = 60.999... too; float64 floor put the last at 60
    assert [top for top, _, _, _ in PF.rmac_regions(62, 2)[7:23:2]] == [0, 8, 17, 26, 34, 43, 52, 61]


def test_rmac_overlap_ties_take_the_smaller_count():
    # 5x9: 2 level-1 regions (side 5, starts 0, 4) overlap 20%, 3 (starts 0, 2, 4) 60%: both 0.2 from 40%
    level1 = [box for box in PF.rmac_regions(5, 9) if box[2] == 5]
    assert level1 == [(0, 0, 5, 5), (0, 4, 5, 5)]
    assert [box for box in PF.rmac_regions(18, 10) if box[2] == 10] == [(0, 0, 10, 10), (8, 0, 10, 10)]


def test_rmac_brute_force(feature_map):
    expected = torch.zeros(feature_map.shape[:2])
    for top, left, h, w in published_rmac_grid(7, 9):
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
