"""The image loader on every PIL mode, sizes, EXIF rotation and broken files."""

import numpy as np
import pytest
import torch
from PIL import Image

from hetretrieval.data.images import ImageLoadError, load_image, read_image_size, resized_shape, to_rgb


def _save(tmp_path, image, name):
    path = tmp_path / name
    image.save(path)
    return path


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_loads_as_rgb(tmp_path, mode):
    gradient = np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (30, 1))
    image = Image.fromarray(np.stack([gradient] * 3, axis=-1)).convert(mode)
    suffix = {"CMYK": ".jpg", "I;16": ".png", "I": ".tif", "F": ".tif", "LA": ".png"}.get(mode, ".png")
    tensor = load_image(_save(tmp_path, image, f"image{suffix}"), max_size=None)
    assert tensor.shape == (3, 30, 40) and tensor.dtype == torch.float32
    assert 0.0 <= tensor.min() and tensor.max() <= 1.0


def test_high_bit_depth_is_stretched():
    image = Image.fromarray(np.array([[1000.5, 2000.5], [3000.5, float("nan")]], dtype=np.float32), mode="F")
    gray = np.asarray(to_rgb(image))[..., 0]
    assert gray[0, 0] == 0 and gray[1, 0] == 255 and gray[0, 1] == 128


def test_transparency_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    tensor = load_image(_save(tmp_path, rgba, "clear.png"), max_size=None)
    torch.testing.assert_close(tensor, torch.ones(3, 4, 4))


def test_resize_caps_longer_side_and_never_upscales(tmp_path):
    path = _save(tmp_path, Image.new("RGB", (1000, 500), "gray"), "wide.jpg")
    assert load_image(path, max_size=800).shape == (3, 400, 800)
    assert load_image(path, max_size=2000).shape == (3, 500, 1000)
    assert resized_shape(3, 3000, 800) == (1, 800)


def test_exif_orientation_applied_consistently(tmp_path):
    image = Image.new("RGB", (60, 20), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert read_image_size(path) == (60, 20)
    assert load_image(path, max_size=30).shape == (3, 30, 10)


def test_broken_files_raise_a_clear_error(tmp_path):
    good = _save(tmp_path, Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "a.jpg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    for path in (truncated, garbage, tmp_path / "missing.jpg"):
        with pytest.raises(ImageLoadError, match=path.name):
            load_image(path)
