"""Whitening fitted on training descriptors after fine-tuning (or on off-the-shelf ones), added as the last layer.

``lw``: learned whitening from matching pairs (Radenović et al.), every same-class pair of the training set;
``pca``: unsupervised PCA-whitening. Descriptors are those of the un-whitened model on centre crops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hetretrieval.errors import ConfigError
from hetretrieval.models.whitening import Whitening, fit_learned_whitening, fit_pca_whitening
from hetretrieval.training.datamodule import TrainingDataModule, describe_crops
from hetretrieval.training.losses import all_pairs

if TYPE_CHECKING:
    from hetretrieval.training.module import FineTuningModule

_KINDS = ("none", "lw", "pca")


@dataclass
class WhiteningOptions:
    kind: str = "none"  # none | lw | pca
    dim: int | None = None  # output dimension; default the descriptor's (needs as many training images)
    shrinkage: float = 0.0  # covariance shrinkage towards the identity, in [0, 1] (lw: of pair differences)

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ConfigError(f"whitening kind must be one of {_KINDS}, got {self.kind!r}")


def fit_whitening(module: FineTuningModule, datamodule: TrainingDataModule, options: WhiteningOptions) -> Whitening:
    """Fit ``options.kind`` whitening on the training set's descriptors of ``module`` without its whitening."""
    if options.kind == "none":
        raise ConfigError("fit_whitening needs whitening kind lw or pca")
    previous, module.whitening = module.whitening, None
    try:
        descriptors = describe_crops(module, datamodule.train_dataset, datamodule.crop_plan,
                                     range(len(datamodule.train_dataset)))
    finally:
        module.whitening = previous
    if options.kind == "pca":
        mean, projection = fit_pca_whitening(descriptors, options.dim, options.shrinkage)
    else:
        positive_first, positive_second, _, _ = all_pairs(datamodule.codes)
        mean, projection = fit_learned_whitening(descriptors, torch.stack([positive_first, positive_second], dim=1),
                                                 options.dim, options.shrinkage)
    return Whitening(mean, projection).to(module.device)
