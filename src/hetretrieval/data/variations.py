"""Controlled appearance variations of heritage collections, as kornia operations on image batches.

One implementation serves the built-in benchmark, the controlled variation study and training augmentation.
Every variation maps `(B, 3, H, W)` RGB in [0, 1] to the same shape and range, takes a `strength` in [0, 1]
(0 = identity, 1 = the strongest setting named in its docstring) and draws any randomness (direction, position)
from an explicit `torch.Generator`, so a seed reproduces it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import kornia
import torch
import torch.nn.functional as F

from hetretrieval.errors import ConfigError

VariationFn = Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _random_sign(generator: torch.Generator) -> float:
    return 1.0 if torch.rand((), generator=generator).item() < 0.5 else -1.0


def _blend(images: torch.Tensor, target: torch.Tensor, strength: float) -> torch.Tensor:
    return torch.lerp(images, target, strength).clamp_(0.0, 1.0)


def grayscale(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Colour domain: desaturate towards luminance (1 = fully grayscale)."""
    return _blend(images, kornia.color.rgb_to_grayscale(images).expand_as(images), strength)


def sepia(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Colour domain: old-photograph sepia toning (1 = fully sepia)."""
    return _blend(images, kornia.color.sepia(images, rescale=True), strength)


def illumination(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Illumination: gamma change, darker or brighter at random (1 = gamma 3 or 1/3)."""
    gamma = (1.0 + 2.0 * strength) ** _random_sign(generator)
    return kornia.enhance.adjust_gamma(images, gamma).clamp_(0.0, 1.0)


def rotation(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Orientation: in-plane rotation about the centre, either direction (1 = 45 degrees), black corners."""
    angle = torch.full((images.shape[0],), 45.0 * strength * _random_sign(generator), device=images.device)
    return kornia.geometry.transform.rotate(images, angle, padding_mode="zeros", align_corners=False)


def _crop_resize(images: torch.Tensor, fraction: float, centre_x: float, centre_y: float) -> torch.Tensor:
    """Crop a window of `fraction` of each side centred at the relative point, resized back to the input size."""
    height, width = images.shape[-2:]
    crop_h, crop_w = max(1, round(height * fraction)), max(1, round(width * fraction))
    top = min(max(0, round(centre_y * height - crop_h / 2)), height - crop_h)
    left = min(max(0, round(centre_x * width - crop_w / 2)), width - crop_w)
    window = images[..., top : top + crop_h, left : left + crop_w]
    return F.interpolate(window, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


def scale(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Scale: zoom into the centre (1 = the central half of each side fills the frame)."""
    return _crop_resize(images, 1.0 - 0.5 * strength, 0.5, 0.5)


def off_centre_crop(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Positioning: a crop whose centre is moved towards a random corner (1 = 60% window at the border)."""
    fraction = 1.0 - 0.4 * strength
    slack = (1.0 - fraction) / 2.0
    centre_x = 0.5 + slack * _random_sign(generator)
    centre_y = 0.5 + slack * _random_sign(generator)
    return _crop_resize(images, fraction, centre_x, centre_y)


def blur(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Quality: Gaussian blur, sigma relative to the image size (1 = sigma of 1.5% of the longer side)."""
    sigma = max(1e-3, 0.015 * strength * max(images.shape[-2:]))
    kernel = 2 * math.ceil(3 * sigma) + 1
    return kornia.filters.gaussian_blur2d(images, (kernel, kernel), (sigma, sigma), border_type="reflect")


def ageing(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Alterations: faded contrast, yellowed paper and grain noise of an aged print (1 = strongly aged)."""
    faded = images * (1.0 - 0.4 * strength) + 0.2 * strength
    paper = torch.tensor([1.0, 0.93, 0.75], device=images.device).view(1, 3, 1, 1)
    yellowed = torch.lerp(faded, faded * paper, strength)
    noise = torch.randn(images.shape, generator=generator).to(images.device)
    return (yellowed + 0.08 * strength * noise).clamp_(0.0, 1.0)


def noise(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Sensor/scan noise: additive Gaussian noise (1 = sigma 0.15)."""
    gaussian = torch.randn(images.shape, generator=generator).to(images.device)
    return (images + 0.15 * strength * gaussian).clamp_(0.0, 1.0)


def occlusion(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Occlusion: a grey rectangle at a random position (1 = covers 40% of the image area)."""
    height, width = images.shape[-2:]
    side = math.sqrt(0.4 * strength)
    box_h, box_w = round(height * side), round(width * side)
    if box_h == 0 or box_w == 0:
        return images.clone()
    top = int(_uniform(generator, 0, height - box_h + 1))
    left = int(_uniform(generator, 0, width - box_w + 1))
    occluded = images.clone()
    occluded[..., top : top + box_h, left : left + box_w] = 0.5
    return occluded


def jpeg(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Compression: JPEG re-encoding (1 = quality 5; 0 = quality 100)."""
    quality = torch.full((images.shape[0],), 100.0 - 95.0 * strength, device=images.device)
    return kornia.enhance.jpeg_codec_differentiable(images, quality).clamp_(0.0, 1.0)


def drawing(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Representation domain: an edge-map "drawing", dark strokes on white paper (1 = pure drawing)."""
    gray = kornia.color.rgb_to_grayscale(images)
    edges = kornia.filters.sobel(gray)
    edges = edges / edges.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    sketch = (1.0 - edges.clamp(0, 1) * 1.5).clamp(0, 1).expand_as(images)
    return _blend(images, sketch, strength)


VARIATIONS: dict[str, VariationFn] = {
    "grayscale": grayscale,
    "sepia": sepia,
    "illumination": illumination,
    "rotation": rotation,
    "scale": scale,
    "off_centre_crop": off_centre_crop,
    "blur": blur,
    "ageing": ageing,
    "noise": noise,
    "occlusion": occlusion,
    "jpeg": jpeg,
    "drawing": drawing,
}


def get_variation(name: str) -> VariationFn:
    """Look up a variation by name, with the list of valid names on a typo."""
    try:
        return VARIATIONS[name]
    except KeyError:
        raise ConfigError(f"unknown variation '{name}'; choose one of: {', '.join(VARIATIONS)}") from None


def apply_variation(images: torch.Tensor, name: str, strength: float, seed: int) -> torch.Tensor:
    """Apply one named variation at `strength` in [0, 1] with its randomness drawn from `seed`."""
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"variation strength must be in [0, 1], got {strength}")
    squeeze = images.dim() == 3
    batch = images.unsqueeze(0) if squeeze else images
    generator = torch.Generator().manual_seed(seed)
    varied = batch.clone() if strength == 0.0 else get_variation(name)(batch, strength, generator)
    return varied.squeeze(0) if squeeze else varied
