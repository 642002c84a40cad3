"""Whitening fitted on training descriptors after fine-tuning (or on off-the-shelf ones), added as the last layer.

``lw``: learned whitening from matching pairs (Radenović et al.), every same-class pair of the training set;
``pca``: unsupervised PCA-whitening. Descriptors are those of the un-whitened model on centre crops.

The same options drive ``hetretrieval-eval``'s test-time whitening (cirtorch's ``--whitening``): there
``fit_on`` names the dataset option whose images (``fit_options`` merged onto it) the whitening is fitted on,
and :func:`fit_descriptor_whitening` fits it on their descriptors (``lw``: every same-class pair of them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hetretrieval.errors import ConfigError
from hetretrieval.models.whitening import Whitening, fit_learned_whitening, fit_pca_whitening

if TYPE_CHECKING:  # Lightning and pytorch-metric-learning load only when fitting: hetretrieval-eval starts faster
    from hetretrieval.training.datamodule import TrainingDataModule
    from hetretrieval.training.module import FineTuningModule

_KINDS = ("none", "lw", "pca")


@dataclass
class WhiteningOptions:
    kind: str = "none"  # none | lw | pca
    dim: int | None = None  # output dimension; default the descriptor's (needs as many training images)
    shrinkage: float = 0.0  # covariance shrinkage towards the identity, in [0, 1] (lw: of pair differences)
    fit_on: str | None = None  # hetretrieval-eval: the dataset option to fit on (train: its training set)
    fit_options: dict[str, Any] | None = None  # merged onto that dataset node (e.g. {domains: [art_painting]})

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ConfigError(f"whitening kind must be one of {_KINDS}, got {self.kind!r}")


def fit_descriptor_whitening(descriptors: torch.Tensor, options: WhiteningOptions,
                             labels: Sequence[str | None] | None = None) -> Whitening:
    """``options.kind`` whitening fitted on ``descriptors (N, D)``; ``lw`` pairs every two descriptors of one
    label (``labels (N,)``; unlabelled ones, None, pair with none)."""
    if options.kind == "pca":
        return Whitening(*fit_pca_whitening(descriptors, options.dim, options.shrinkage))
    if options.kind != "lw":
        raise ConfigError("fitting a whitening needs whitening kind lw or pca")
    if labels is None:
        raise ConfigError("learned whitening (lw) needs labelled descriptors")
    from hetretrieval.training.losses import all_pairs

    names = sorted({label for label in labels if label is not None})
    codes = torch.tensor([names.index(label) if label is not None else -1 for label in labels])
    first, second, _, _ = all_pairs(codes)
    labelled = codes[first] >= 0
    if not bool(labelled.any()):
        raise ConfigError("learned whitening (lw) needs at least one pair of images of one class")
    pairs = torch.stack([first[labelled], second[labelled]], dim=1)
    return Whitening(*fit_learned_whitening(descriptors, pairs, options.dim, options.shrinkage))


def fit_whitening(module: FineTuningModule, datamodule: TrainingDataModule, options: WhiteningOptions) -> Whitening:
    """Fit ``options.kind`` whitening on the training set's descriptors of ``module`` without its whitening."""
    if options.kind == "none":
        raise ConfigError("fit_whitening needs whitening kind lw or pca")
    from hetretrieval.training.datamodule import describe_crops
    from hetretrieval.training.losses import all_pairs

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
