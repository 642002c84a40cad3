"""Building heads from config nodes, shared by evaluation, the study and training."""

from __future__ import annotations

from collections.abc import Mapping

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


def build_heads(nodes: Mapping[str, DictConfig], backbone: nn.Module) -> tuple[dict[str, nn.Module], dict]:
    """`{name: node}` -> `(global heads, local extractors)` by name: poolings of the backbone's map, and DELF /
    ORB, which describe images themselves."""
    from hetretrieval.models.local.pipeline import LOCAL_EXTRACTORS

    built = {name: build_head(node, backbone) for name, node in nodes.items()}
    return ({n: h for n, h in built.items() if not isinstance(h, LOCAL_EXTRACTORS)},
            {n: h for n, h in built.items() if isinstance(h, LOCAL_EXTRACTORS)})
