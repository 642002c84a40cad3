"""Building heads from config nodes, shared by evaluation and training."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from torch import nn

from hetretrieval.config import instantiate


def build_head(node: DictConfig, backbone: nn.Module) -> nn.Module:
    """The pooling head; a config that leaves `backbone: ???` (NetVLAD, DELF) gets the evaluated backbone."""
    if "backbone" not in node.keys() or not OmegaConf.is_missing(node, "backbone"):
        return instantiate(node)
    options = OmegaConf.to_container(node, resolve=True)
    del options["backbone"]
    return instantiate(OmegaConf.create(options), backbone=backbone)
