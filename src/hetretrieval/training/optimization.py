"""Optimiser and learning-rate schedule of fine-tuning, with the conventions of Radenović et al. (cirtorch).

The backbone trains at a small ``lr`` with weight decay; the pooling head (GeM ``p``, any other head parameter)
at ``head_lr_factor x lr`` without weight decay, since decaying ``p`` would pull GeM towards average pooling.
The learning rate decays once per epoch, exponentially (cirtorch: ``gamma = exp(-0.01)``) or along a cosine.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from hetretrieval.errors import ConfigError

_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
_SCHEDULES = ("exponential", "cosine", "constant")


@dataclass
class OptimizerOptions:
    """How the fine-tuned parameters are optimised (see the module docstring)."""

    name: str = "adam"  # adam | adamw
    lr: float = 1e-6  # backbone learning rate (cirtorch's Adam default)
    head_lr_factor: float = 10.0  # the head (GeM p) learns this many times faster, without weight decay
    weight_decay: float = 1e-6  # backbone only
    schedule: str = "exponential"  # exponential | cosine | constant, stepped once per epoch
    gamma: float = math.exp(-0.01)  # exponential decay factor per epoch

    def __post_init__(self) -> None:
        if self.name not in _OPTIMIZERS:
            raise ConfigError(f"optimizer name must be one of {sorted(_OPTIMIZERS)}, got {self.name!r}")
        if self.schedule not in _SCHEDULES:
            raise ConfigError(f"optimizer schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
        if not (self.lr > 0 and self.head_lr_factor > 0 and self.weight_decay >= 0 and 0 < self.gamma <= 1):
            raise ConfigError("optimizer needs lr > 0, head_lr_factor > 0, weight_decay >= 0 and gamma in (0, 1], "
                              f"got {self.lr}, {self.head_lr_factor}, {self.weight_decay}, {self.gamma}")


def parameter_groups(backbone: nn.Module, head: nn.Module, options: OptimizerOptions) -> list[dict]:
    """The backbone group (``lr``, weight decay) and the head group (``lr x head_lr_factor``, no decay)."""
    groups = [
        {"name": "backbone", "params": _trainable(backbone.parameters()), "lr": options.lr,
         "weight_decay": options.weight_decay},
        {"name": "head", "params": _trainable(head.parameters()), "lr": options.lr * options.head_lr_factor,
         "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    if not groups:
        raise ConfigError("nothing to fine-tune: the backbone and the head have no trainable parameters")
    return groups


def build_optimization(
    backbone: nn.Module, head: nn.Module, options: OptimizerOptions, max_epochs: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimiser over :func:`parameter_groups` and its per-epoch schedule (cosine spans ``max_epochs``)."""
    optimizer = _OPTIMIZERS[options.name](parameter_groups(backbone, head, options))
    if options.schedule == "exponential":
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=options.gamma)
    elif options.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, max_epochs))
    else:
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    return optimizer, scheduler


def _trainable(parameters: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in parameters if p.requires_grad]
