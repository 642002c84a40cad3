"""Image loading for collections found in the wild: any PIL mode to RGB, longer side capped, aspect kept.

Heritage archives mix 16-bit and float scans, palette PNGs with transparency, CMYK prints and huge grayscale
scans; every one of them must become the same thing, an RGB tensor in [0, 1], or a clear `ImageLoadError`.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error we report, not a half-grey image
# Pillow's own bomb check (a warning above 89 MP, an error above 179 MP) is process-wide, fixed and raises
# outside ImageLoadError; every image of this package is opened here, through the `max_pixels` check instead.
Image.MAX_IMAGE_PIXELS = None
# 250 MP admits the large scans of heritage archives, up to an A0 plan at 400 dpi (13,244 x 18,720 = 248 MP),
# which Pillow's limit refuses; decoding one still costs about 3 bytes a pixel (0.75 GB at the cap), more
# for 16-bit and float scans, so the cap (`extraction.max_pixels`) bounds what a single file may demand.
DEFAULT_MAX_PIXELS = 250_000_000

_ALPHA_BACKGROUND = (255, 255, 255)


class ImageLoadError(Exception):
    """An image file cannot be decoded (missing, corrupt, truncated or an unsupported format)."""


def resized_shape(height: int, width: int, max_size: int | None) -> tuple[int, int]:
    """Shape after capping the longer side at `max_size` (never upscaled; aspect kept; sides >= 1)."""
    if max_size is None or max(height, width) <= max_size:
        return height, width
    scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    High bit-depth and float modes (I;16, I, F) are min-max stretched to 8 bits over their finite values, because
    their ranges are arbitrary (a float TIFF may hold densities, a 16-bit scan 0..65535); transparent modes (RGBA,
    LA, P with transparency) are composited on white, the colour of paper.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}:
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        scaled = np.zeros_like(values) if high <= low else (np.nan_to_num(values, nan=low) - low) / (high - low)
        gray = (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in {"RGBA", "LA", "PA", "RGBa", "La"}:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


CROP_KEY = "crop"  # record metadata "x1,y1,x2,y2": describe only this box of the image (e.g. a query's bbx)


def parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    """`"x1,y1,x2,y2"` (pixels of the displayed image) -> a box tuple; None or "" -> None."""
    if not text:
        return None
    try:
        x1, y1, x2, y2 = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"a crop box is 'x1,y1,x2,y2', got '{text}'") from None
    return x1, y1, x2, y2


def clip_box(height: int, width: int, box) -> tuple[int, int, int, int]:
    """A box `(x1, y1, x2, y2)` rounded to pixels and clipped to a `height` x `width` image; ValueError if empty."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    clipped = (max(0, x1), max(0, y1), min(width, x2), min(height, y2))
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        raise ValueError(f"box {tuple(box)} does not overlap the {width}x{height} image")
    return clipped


def load_image(path: str | Path, max_size: int | None = 800, box=None, *,
               max_pixels: int | None = DEFAULT_MAX_PIXELS, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Read an image file as an RGB float tensor `(3, H, W)` in [0, 1], longer side at most `max_size`.

    EXIF orientation is applied. With `box (x1, y1, x2, y2)`, only that region (`clip_box`) is kept, before
    resizing. JPEGs much larger than the target are decoded at reduced size (`draft`), then resized with
    antialiasing, so a 4096² scan costs little more than an 800² one; with a box, only when the JPEG is stored
    upright, the reduced image then mapping the box exactly (a flipped axis would shift it by the padding of
    the last reduced pixel). A file of more than `max_pixels` pixels (header size; None: no limit) is refused.
    `size (height, width)`, if given, replaces the max-side shape (aspect buckets: `extraction.bucketing`).
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            _check_pixels(path, image, max_pixels)
            full = _oriented_size(image)
            left, top, right, bottom = clip_box(*full, box) if box is not None else (0, 0, full[1], full[0])
            height, width = size if size is not None else resized_shape(bottom - top, right - left, max_size)
            reduction = 1
            if image.format == "JPEG" and (box is None or image.getexif().get(0x0112, 1) == 1):
                # the whole image at the size that keeps the region at least (height, width), in stored axes
                wanted = (-(-full[1] * width // (right - left)), -(-full[0] * height // (bottom - top)))
                stored_width = image.width
                drafted = image.draft(None, wanted if full == (image.height, image.width) else wanted[::-1])
                reduction = stored_width / drafted[1][2] if drafted else 1
            image = to_rgb(ImageOps.exif_transpose(image))
            if box is not None and reduction == 1:
                image = image.crop((left, top, right, bottom))
            elif box is not None:  # the box in the reduced image's (fractional) pixels
                region = (left / reduction, top / reduction, right / reduction, bottom / reduction)
                image = image.resize((width, height), Image.Resampling.BICUBIC, box=region, reducing_gap=3.0)
            if (height, width) != (image.height, image.width):
                image = image.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=3.0)
            array = np.asarray(image, dtype=np.uint8)
    except FileNotFoundError as error:
        raise ImageLoadError(f"{path}: file not found") from error
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as error:
        raise ImageLoadError(f"{path}: cannot decode image ({type(error).__name__}: {error})") from error
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def _check_pixels(path: Path, image: Image.Image, max_pixels: int | None) -> None:
    """Refuse, from the header alone, an image of more than `max_pixels` pixels (None: no limit)."""
    pixels = image.width * image.height
    if max_pixels is not None and pixels > max_pixels:
        raise ImageLoadError(f"{path}: {image.width}x{image.height} is {pixels:,} pixels, more than "
                             f"max_pixels {max_pixels:,}; raise extraction.max_pixels to read it")


def _oriented_size(image: Image.Image, header_only: bool = False) -> tuple[int, int]:
    """`(height, width)` as displayed, i.e. after the EXIF orientation is applied. `header_only` (a just-opened
    image): a PNG whose `eXIf` chunk is not among those read so far is not decoded to look for one later."""
    if header_only and image.format == "PNG" and "exif" not in image.info and not _png_has_exif(image.fp):
        return image.height, image.width  # no EXIF at all: Pillow would decode the whole image to learn that
    swap = image.getexif().get(0x0112, 1) in {5, 6, 7, 8}
    return (image.width, image.height) if swap else (image.height, image.width)


def _png_has_exif(file) -> bool:
    """Whether an open PNG holds an `eXIf` chunk (one after the pixel data is not in `image.info` until Pillow
    decodes the whole image). Walks the chunk headers, seeking over their data; the file position is kept."""
    position = file.tell()
    try:
        file.seek(8)  # past the signature
        while len(header := file.read(8)) == 8:
            length, kind = struct.unpack(">I4s", header)
            if kind in (b"eXIf", b"IEND"):
                return kind == b"eXIf"
            file.seek(length + 4, os.SEEK_CUR)  # data and CRC
        return False  # truncated: decoding will say so
    finally:
        file.seek(position)


def read_image_size(path: str | Path, box=None, *,
                    max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """`(height, width)` as displayed (of `box` within it, if given), from the file header only (cheap).

    An image of more than `max_pixels` pixels (None: no limit) is refused, as `load_image` would refuse it.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            _check_pixels(path, image, max_pixels)
            size = _oriented_size(image, header_only=True)
            if box is None:
                return size
            left, top, right, bottom = clip_box(*size, box)
            return bottom - top, right - left
    except FileNotFoundError as error:
        raise ImageLoadError(f"{path}: file not found") from error
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as error:
        raise ImageLoadError(f"{path}: cannot read image header ({type(error).__name__}: {error})") from error


def save_image(image: torch.Tensor, path: str | Path) -> None:
    """Write a `(3, H, W)` [0, 1] tensor as an 8-bit image file (format from the suffix)."""
    array = (image.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    Image.fromarray(array, mode="RGB").save(path)


def square_crop(image: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`(3, H, W)` -> `(3, size, size)`: shorter side resized to `size`, then a square cut at a random position
    drawn from `generator` (the centre without one). Training crops and the images mining describes."""
    import torch.nn.functional as F

    height, width = image.shape[-2:]
    ratio = size / min(height, width)
    resized_h, resized_w = max(size, round(height * ratio)), max(size, round(width * ratio))
    resized = F.interpolate(image[None], size=(resized_h, resized_w), mode="bilinear", antialias=True,
                            align_corners=False)[0].clamp_(0, 1)
    if generator is None:
        top, left = (resized_h - size) // 2, (resized_w - size) // 2
    else:
        top = int(torch.randint(resized_h - size + 1, (), generator=generator))
        left = int(torch.randint(resized_w - size + 1, (), generator=generator))
    return resized[:, top : top + size, left : left + size]
