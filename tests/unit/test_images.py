"""The image loader on every PIL mode, sizes, EXIF rotation, broken files and pixel limits."""

import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, JpegImagePlugin

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


def _png_with_exif_after_pixels(path, height, width, orientation):
    """A PNG whose eXIf chunk follows its pixel data (Pillow writes it before; the PNG format allows either)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buffer, format="PNG", exif=exif)
    data, chunks, position = buffer.getvalue(), [], 8
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        chunks.append((kind, data[position:position + 12 + length]))
        position += 12 + length
    order = [c for k, c in chunks if k not in (b"eXIf", b"IEND")] + [c for k, c in chunks if k == b"eXIf"]
    path.write_bytes(data[:8] + b"".join(order) + chunks[-1][1])
    return path


def test_png_header_size_without_decoding_and_with_a_late_exif(tmp_path, monkeypatch):
    plain = _save(tmp_path, Image.new("RGB", (60, 20), "white"), "plain.png")
    late = _png_with_exif_after_pixels(tmp_path / "late.png", 20, 60, orientation=6)
    with Image.open(late) as image:
        assert "exif" not in image.info  # Pillow would decode the whole image to find it
    assert read_image_size(late) == (60, 20) and load_image(late, max_size=None).shape == (3, 60, 20)

    def decoded(self):
        raise AssertionError("the header scan decoded the pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decoded)
    assert read_image_size(plain) == (20, 60)


def test_broken_files_raise_a_clear_error(tmp_path):
    good = _save(tmp_path, Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "a.jpg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    for path in (truncated, garbage, tmp_path / "missing.jpg"):
        with pytest.raises(ImageLoadError, match=path.name):
            load_image(path)


def _pgm_header(path, width, height):
    """A PGM claiming `width` x `height` gray pixels but holding none: cheap, and opened from its header."""
    path.write_bytes(b"P5\n%d %d\n255\n" % (width, height))
    return path


def test_a_196_megapixel_scan_is_read(tmp_path):
    path = _pgm_header(tmp_path / "scan.pgm", 14000, 14000)  # Pillow's own check refuses it (> 179 MP)
    assert read_image_size(path) == (14000, 14000)


def test_max_pixels_refuses_from_the_header(tmp_path):
    huge = _pgm_header(tmp_path / "huge.pgm", 20000, 20000)
    for read in (read_image_size, load_image):
        with pytest.raises(ImageLoadError, match=r"pgm: 20000x20000 is 400,000,000 .*raise extraction.max_pixels"):
            read(huge)
    assert read_image_size(huge, max_pixels=None) == (20000, 20000)
    assert read_image_size(huge, max_pixels=400_000_000) == (20000, 20000)
    small = _save(tmp_path, Image.new("RGB", (100, 50)), "small.png")
    with pytest.raises(ImageLoadError, match="5,000 pixels"):
        load_image(small, max_pixels=4999)
    assert load_image(small, max_pixels=5000).shape == (3, 50, 100)


def test_pillow_bomb_check_never_escapes(tmp_path, monkeypatch):
    path = _save(tmp_path, Image.new("RGB", (40, 40)), "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # as if something re-enabled Pillow's global check
    for read in (read_image_size, load_image):
        with pytest.raises(ImageLoadError, match="DecompressionBomb"):
            read(path, max_pixels=None)


def test_jpeg_crop_decoded_reduced(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    pixels = np.asarray(Image.fromarray(rng.integers(0, 255, (81, 101, 3), np.uint8)).resize((2003, 1601)))
    jpeg = _save(tmp_path, Image.fromarray(pixels), "big.jpg")
    png = _save(tmp_path, Image.open(jpeg), "big.png")  # the same decoded pixels, never drafted
    reductions = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def draft(image, mode, size):
        width = image.width
        drafted = original_draft(image, mode, size)
        reductions.append(width / drafted[1][2])
        return drafted

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)
    box = (401.3, 299.6, 1603.0, 1297.0)
    reduced, reference = load_image(jpeg, 150, box), load_image(png, 150, box)
    assert reductions == [8.0] and reduced.shape == reference.shape == (3, 124, 150)
    shifted = load_image(png, 150, (box[0] + 4, box[1], box[2] + 4, box[3]))  # by half an output pixel
    assert (reduced - reference).abs().mean() < 0.015 < 0.03 < (reduced - shifted).abs().mean()

    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(rotated, exif=exif)
    reductions.clear()  # not drafted: the box would not map exactly onto a flipped axis
    assert load_image(rotated, 150, box).shape == (3, *resized_shape(*read_image_size(rotated, box), 150))
    assert reductions == []
