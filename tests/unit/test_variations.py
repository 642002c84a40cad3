"""Variations: identity at zero strength, range and shape kept, reproducible for a seed; what each does."""

import math

import pytest
import torch

from hetretrieval.data.variations import VARIATIONS, apply_variation, get_variation
from hetretrieval.errors import ConfigError

IMAGES = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(VARIATIONS))
def test_variation_contract(name):
    varied = apply_variation(IMAGES, name, 0.8, seed=3)
    assert varied.shape == IMAGES.shape
    assert varied.min() >= 0 and varied.max() <= 1
    assert (varied - IMAGES).abs().mean() > 1e-3
    torch.testing.assert_close(varied, apply_variation(IMAGES, name, 0.8, seed=3))
    torch.testing.assert_close(apply_variation(IMAGES, name, 0.0, seed=3), IMAGES)


def test_grayscale_has_equal_channels():
    gray = apply_variation(IMAGES, "grayscale", 1.0, seed=0)
    torch.testing.assert_close(gray[:, 0], gray[:, 1])


def test_single_image_and_errors():
    assert apply_variation(IMAGES[0], "blur", 0.5, seed=0).shape == IMAGES[0].shape
    with pytest.raises(ConfigError, match="unknown variation"):
        get_variation("sepai")
    with pytest.raises(ConfigError):
        apply_variation(IMAGES, "blur", 1.5, seed=0)


# --- what each variation does, against hand computations on synthetic patterns -------------------------------

SEPIA = torch.tensor([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]])  # the classic matrix


def _ramp(height=32, width=64):
    """One image whose value is the column's relative position: x / (width - 1) in every channel."""
    return torch.linspace(0, 1, width).expand(1, 3, height, width).clone()


def test_grayscale_is_the_rec601_luminance():
    gray = apply_variation(IMAGES, "grayscale", 1.0, seed=0)
    luminance = 0.299 * IMAGES[:, 0] + 0.587 * IMAGES[:, 1] + 0.114 * IMAGES[:, 2]
    for channel in range(3):
        torch.testing.assert_close(gray[:, channel], luminance, atol=1e-3, rtol=0)


def test_sepia_is_the_sepia_matrix_rescaled_per_image_and_blends_with_strength():
    toned = torch.einsum("oc,bchw->bohw", SEPIA, IMAGES)
    toned = toned / toned.amax(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(apply_variation(IMAGES, "sepia", 1.0, seed=0), toned, atol=1e-5, rtol=0)
    torch.testing.assert_close(apply_variation(IMAGES, "sepia", 0.25, seed=0), 0.75 * IMAGES + 0.25 * toned,
                               atol=1e-5, rtol=0)
    gray = apply_variation(torch.full((1, 3, 4, 4), 0.5), "sepia", 1.0, seed=0)[0, :, 0, 0]
    torch.testing.assert_close(gray / gray[0], torch.tensor([1.0, 1.203 / 1.351, 0.937 / 1.351]))  # the tint


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_illumination_is_a_gamma_of_three_or_a_third(seed):
    images = torch.linspace(0.01, 1, 48).view(1, 3, 4, 4)
    varied = apply_variation(images, "illumination", 1.0, seed=seed)
    assert any(torch.allclose(varied, images**gamma, atol=1e-5) for gamma in (3.0, 1 / 3))
    half = apply_variation(images, "illumination", 0.5, seed=seed)
    assert any(torch.allclose(half, images**gamma, atol=1e-5) for gamma in (2.0, 0.5))


def _principal_angle(image):
    """Orientation in degrees (counter-clockwise, y up) of the bright pattern's principal axis, from moments."""
    weight = image[0].mean(0)
    ys, xs = torch.meshgrid(torch.arange(weight.shape[0]).float(), torch.arange(weight.shape[1]).float(),
                            indexing="ij")
    total = weight.sum()
    mx, my = (weight * xs).sum() / total, (weight * ys).sum() / total
    cxx = (weight * (xs - mx) ** 2).sum()
    cyy = (weight * (ys - my) ** 2).sum()
    cxy = (weight * (xs - mx) * (ys - my)).sum()
    return -math.degrees(0.5 * math.atan2(2 * cxy, cxx - cyy))  # image rows grow downwards


@pytest.mark.parametrize(("strength", "seed"), [(1.0, 0), (0.5, 1), (0.5, 2)])
def test_rotation_angle_is_recovered_from_a_bar(strength, seed):
    bar = torch.zeros(1, 3, 65, 65)
    bar[..., 30:35, 8:57] = 1.0  # a horizontal bar through the centre
    assert _principal_angle(bar) == pytest.approx(0.0, abs=0.1)
    angle = _principal_angle(apply_variation(bar, "rotation", strength, seed=seed))
    assert abs(angle) == pytest.approx(45.0 * strength, abs=1.0)


def test_scale_and_off_centre_crop_windows():
    ramp = _ramp()
    zoomed = apply_variation(ramp, "scale", 1.0, seed=0)[0, 0, 0]  # the central half of each side
    assert zoomed[0].item() == pytest.approx(16 / 63, abs=0.02) and zoomed[-1].item() == pytest.approx(47 / 63, abs=0.02)
    for seed in range(4):  # a 60% window pushed to the left or right border
        row = apply_variation(ramp, "off_centre_crop", 1.0, seed=seed)[0, 0, 0]
        span = (row[0].item(), row[-1].item())
        assert span == pytest.approx((0.0, 38 / 63), abs=0.02) or span == pytest.approx((26 / 63, 1.0), abs=0.02)


def test_blur_sigma_is_relative_to_the_longer_side():
    impulse = torch.zeros(1, 3, 101, 101)
    impulse[..., 50, 50] = 1.0
    spread = apply_variation(impulse, "blur", 1.0, seed=0)[0, 0]  # sigma = 0.015 * 101 = 1.515
    offsets = torch.arange(101).float() - 50
    variance = (spread.sum(0) * offsets**2).sum() / spread.sum()
    assert variance.sqrt().item() == pytest.approx(0.015 * 101, rel=0.02)


def test_noise_ageing_and_occlusion_statistics():
    grey = torch.full((1, 3, 128, 128), 0.5)
    noisy = apply_variation(grey, "noise", 1.0, seed=0)
    assert (noisy - grey).std().item() == pytest.approx(0.15, rel=0.05)
    aged = apply_variation(grey, "ageing", 1.0, seed=0)  # faded 0.5 * 0.6 + 0.2, paper tint, grain 0.08
    torch.testing.assert_close(aged.mean(dim=(0, 2, 3)), 0.5 * torch.tensor([1.0, 0.93, 0.75]), atol=0.01, rtol=0)
    assert (aged - aged.mean(dim=(2, 3), keepdim=True)).std().item() == pytest.approx(0.08, rel=0.1)
    ones = torch.ones(1, 3, 40, 50)
    occluded = apply_variation(ones, "occlusion", 1.0, seed=0)
    box = occluded[0, 0] == 0.5
    rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
    side = math.sqrt(0.4)
    assert (len(rows), len(cols)) == (round(40 * side), round(50 * side)) and box.sum() == len(rows) * len(cols)
    assert (occluded[0, 0][~box] == 1).all()


def test_jpeg_quality_falls_with_strength_and_drawing_draws_edges():
    errors = [(apply_variation(IMAGES, "jpeg", s, seed=0) - IMAGES).abs().mean().item() for s in (0.2, 0.6, 1.0)]
    assert errors[0] < errors[1] < errors[2]
    halves = torch.zeros(1, 3, 32, 32)
    halves[..., 16:] = 1.0  # a vertical edge between columns 15 and 16
    drawn = apply_variation(halves, "drawing", 1.0, seed=0)[0, 0]
    assert drawn[:, :13].min() > 0.99 and drawn[:, 19:].min() > 0.99  # white paper away from the edge
    assert (drawn[4:-4, 15:17] == 0).all()  # a dark stroke on it
