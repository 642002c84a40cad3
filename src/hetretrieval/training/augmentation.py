"""Variation-aware augmentation: the heritage variations of `data/variations.py`, drawn at random per image.

Each training image undergoes each configured variation independently with its probability, at a strength
drawn uniformly from ``strength_range``, in the registry's order. The randomness comes from an explicit
generator seeded by ``(seed, draw)``, the caller passing a draw number unique to the batch (epoch and batch
index), so a resumed run sees the same augmented pixels as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from hetretrieval.data.variations import VARIATIONS, get_variation
from hetretrieval.errors import ConfigError
from hetretrieval.seeding import mix_seed


class VariationAugmentation(nn.Module):
    """``(B, 3, H, W)`` in [0, 1] -> the same shape, each image varied at random (see the module docstring)."""

    def __init__(self, probabilities: Mapping[str, float], strength_range: Sequence[float] = (0.3, 1.0),
                 seed: int = 0) -> None:
        super().__init__()
        for name, probability in probabilities.items():
            get_variation(name)
            if not 0.0 <= probability <= 1.0:
                raise ConfigError(f"augmentation probability of '{name}' must lie in [0, 1], got {probability}")
        low, high = (float(s) for s in strength_range)
        if not 0.0 <= low <= high <= 1.0:
            raise ConfigError(f"augmentation strength_range must satisfy 0 <= low <= high <= 1, got {[low, high]}")
        # Registry order, so that the result does not depend on the order of the config's keys.
        self.probabilities = {name: float(probabilities[name]) for name in VARIATIONS if name in probabilities}
        self.strength_range = (low, high)
        self.seed = seed

    def forward(self, images: Tensor, draw: int) -> Tensor:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, draw))
        low, high = self.strength_range
        varied = []
        for image in images.split(1):
            for name, probability in self.probabilities.items():
                if torch.rand((), generator=generator).item() < probability:
                    strength = low + (high - low) * torch.rand((), generator=generator).item()
                    image = VARIATIONS[name](image, strength, generator)
            varied.append(image)
        return torch.cat(varied)

    def extra_repr(self) -> str:
        return f"probabilities={self.probabilities}, strength_range={self.strength_range}, seed={self.seed}"
