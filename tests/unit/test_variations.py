"""Variations: identity at zero strength, range and shape kept, reproducible for a seed."""

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
