"""One checkpoint reader: every user file that `torch.load` reads, and fine-tuned models rebuilt from one.

:func:`read_torch_file` is the project's only `torch.load` of such files (backbone weights, NetVLAD caches,
attention and training checkpoints): `weights_only=True`, onto the CPU, and one line when the file is missing
or is no PyTorch weights file.

A fine-tuned checkpoint stores its architecture (under ``"architecture"``) as names and plain options, never
as Hydra ``_target_`` nodes, since a checkpoint naming a callable would run it when loaded::

    {"backbone": {"model_name": "tf_efficientnet_lite0"},
     "head": {"name": "gem", "options": {"p": 3.0, "eps": 1e-06, "learn_p": True}}}

:func:`load_fine_tuned` rebuilds it only through `BACKBONE` and `HEADS`, after checking every key and value.
`HEADS` is the single registry of heads by name: configs name heads by `_target_`, so only checkpoints need
names, and the registry lives here beside the one reader that trusts it. Checkpoints of the earlier layout
(the config nodes themselves) are converted when their `_target_`s are exactly registered classes and their
keys and values pass the same check.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import NoneType
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from hetretrieval.errors import ConfigError, DataError, HetRetrievalError
from hetretrieval.models.backbones import Backbone
from hetretrieval.models.pooling.heads import MAC, RMAC, GeM, SPoC
from hetretrieval.models.pooling.netvlad import NetVLAD
from hetretrieval.models.whitening import Whitening

ARCHITECTURE = "architecture"  # the checkpoint key holding the stored architecture

FLOAT, INT, BOOL, STR = (float, int), (int,), (bool,), (str,)
OPTIONAL_INT, OPTIONAL_STR = (int, NoneType), (str, NoneType)
LAYER = (int, str, NoneType)  # Backbone.layer: a feature_info position or module name


def read_torch_file(path: str | Path, what: str, error: type[HetRetrievalError] = DataError) -> Any:
    """The object `torch.save` wrote to `path`, read with `weights_only=True` onto the CPU.

    `what` names the file in errors (e.g. "backbone checkpoint"), `error` is their class. torch's own message
    for a file it cannot read is dropped: it advises turning `weights_only` off, which runs any code the file
    holds.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise error(f"{what} '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as failure:
        raise error(f"{what} '{path}' cannot be read ({failure.strerror})") from None
    except Exception as failure:  # foreign or damaged files fail anywhere in torch, as any type (OSError too)
        raise error(
            f"{what} '{path}' is not a PyTorch weights file ({_unreadable_because(path, failure)})"
        ) from None


def _unreadable_because(path: Path, failure: Exception) -> str:
    """Why `torch.load` failed, in a few words."""
    with path.open("rb") as file:
        start = file.read(2)
    if not start:
        return "the file is empty"
    if start != b"PK" and start[:1] != b"\x80":  # torch.save writes a zip archive (legacy format: a pickle)
        return "neither a zip archive nor a pickle"
    if isinstance(failure, pickle.UnpicklingError):
        refused = re.search(r"GLOBAL (\S+)", str(failure))
        return f"it holds {refused.group(1) if refused else 'objects'}, not only tensors and plain values"
    return "truncated or corrupt"


# --- the components a checkpoint may name ----------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    """A class a checkpoint may name, and the options it takes, each with the plain types it accepts."""

    target: str  # its `_target_` in configs (and in legacy checkpoints)
    build: Callable[..., nn.Module]  # options -> module; a head's also takes the backbone first
    options: Mapping[str, tuple[type, ...]]  # constructor options stored in checkpoints
    config_only: Mapping[str, tuple[type, ...]] = field(default_factory=dict)  # config keys that do not shape
    # the weights: checked, then dropped


def _head(cls: type[nn.Module]) -> Callable[..., nn.Module]:
    return lambda backbone, **options: cls(**options)


BACKBONE = Component(
    "hetretrieval.models.backbones.Backbone",
    # weights: the state dict's
    lambda model_name, layer=None: Backbone(model_name, pretrained=False, checkpoint=None, layer=layer),
    {"model_name": STR, "layer": LAYER},
    {"pretrained": BOOL, "checkpoint": OPTIONAL_STR},
)

HEADS: dict[str, Component] = {
    "mac": Component("hetretrieval.models.pooling.heads.MAC", _head(MAC), {}),
    "spoc": Component("hetretrieval.models.pooling.heads.SPoC", _head(SPoC), {}),
    "gem": Component(
        "hetretrieval.models.pooling.heads.GeM", _head(GeM), {"p": FLOAT, "eps": FLOAT, "learn_p": BOOL}
    ),
    "rmac": Component(
        "hetretrieval.models.pooling.heads.RMAC", _head(RMAC), {"levels": INT, "overlap": FLOAT}
    ),
    "netvlad": Component(
        "hetretrieval.models.pooling.netvlad.NetVLAD.for_backbone",
        NetVLAD.for_backbone,
        {"n_clusters": INT, "dim": OPTIONAL_INT},
        {  # what `prepare` initialises from, not what the weights are
            "backbone": STR,
            "cache_dir": OPTIONAL_STR,
            "image_set": STR,
            "max_images": OPTIONAL_INT,
            "samples_per_image": INT,
            "seed": INT,
            "whitening_dim": OPTIONAL_INT,
            "whitening_shrinkage": FLOAT,
        },
    ),
}


class _Refused(Exception):
    """What an architecture names that is not registered, as a phrase ("names head 'x'")."""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _head_named_by(target: Any) -> str | None:
    return next((name for name, head in HEADS.items() if type(target) is str and head.target == target), None)


def _options(node: Any, component: Component, part: str, *, config_keys: bool = False) -> dict:
    """The stored options of `node` (a dict), once each key is an option of `component` (or, with
    `config_keys`, one of its config-only keys or `_target_`) and each value is of exactly a type it
    accepts."""
    if type(node) is not dict:
        raise _Refused(f"names {part} options of type {type(node).__name__}")
    accepted = {**component.options, **({**component.config_only, "_target_": STR} if config_keys else {})}
    for key, value in node.items():
        if type(key) is not str or key not in accepted:
            raise _Refused(f"names {part} option {_short(key)}")
        if type(value) not in accepted[key]:
            raise _Refused(f"names {part} option '{key}' with a {type(value).__name__} value")
    return {key: node[key] for key in component.options if key in node}


def _stored_architecture(architecture: Any) -> dict:
    """`architecture` in the stored layout, checked (or converted from the legacy `_target_` layout)."""
    if type(architecture) is not dict or set(architecture) != {"backbone", "head"}:
        raise _Refused("has an architecture other than {backbone, head}")
    backbone, head = architecture["backbone"], architecture["head"]
    if type(head) is dict and "_target_" in head:  # legacy: the config nodes themselves
        name = _head_named_by(head["_target_"])
        if name is None:
            raise _Refused(f"names head {_short(head['_target_'])}")
        if type(backbone) is not dict or backbone.get("_target_") != BACKBONE.target:
            raise _Refused(
                f"names backbone {_short(backbone.get('_target_') if type(backbone) is dict else backbone)}"
            )
        return {
            "backbone": _options(backbone, BACKBONE, "backbone", config_keys=True),
            "head": {
                "name": name,
                "options": _options(head, HEADS[name], f"head '{name}'", config_keys=True),
            },
        }
    if type(head) is not dict or set(head) != {"name", "options"}:
        raise _Refused(f"names a head other than {{name, options}}: {_short(head)}")
    name = head["name"]
    if type(name) is not str or name not in HEADS:
        raise _Refused(f"names head {_short(name)}")
    return {
        "backbone": _options(backbone, BACKBONE, "backbone"),
        "head": {"name": name, "options": _options(head["options"], HEADS[name], f"head '{name}'")},
    }


def architecture_from_config(backbone_node: Mapping, pooling_node: Mapping) -> dict:
    """The architecture a fine-tuning run stores, from the composed `cfg.backbone` and `cfg.pooling` nodes.

    Names and plain options only (the layout of the module docstring); a pooling that `HEADS` does not name
    (DELF, ORB) cannot be fine-tuned.
    """
    backbone, pooling = (
        OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        for node in (backbone_node, pooling_node)
    )
    if backbone.get("layer", 0) is None:  # the default map: stored as before `layer` existed
        del backbone["layer"]
    name = _head_named_by(pooling.get("_target_"))
    if name is None:
        raise ConfigError(
            f"cannot fine-tune pooling {_short(pooling.get('_target_'))}: a checkpoint can only "
            f"name {', '.join(HEADS)}"
        )
    if backbone.get("_target_") != BACKBONE.target:
        raise ConfigError(
            f"cannot fine-tune backbone {_short(backbone.get('_target_'))}: a checkpoint can only "
            f"name {BACKBONE.target}"
        )
    try:
        return _stored_architecture({"backbone": backbone, "head": pooling})
    except _Refused as refused:
        raise ConfigError(
            f"cannot fine-tune: the config {refused}, which a checkpoint cannot store"
        ) from None


# --- rebuilding a fine-tuned model -----------------------------------------------------------------------


@dataclass(frozen=True)
class FineTuned:
    """A fine-tuned model rebuilt from its checkpoint, in eval mode; `architecture` is its checked layout."""

    backbone: Backbone
    head: nn.Module
    whitening: Whitening | None
    architecture: dict


def whitening_from_state(
    state_dict: Mapping[str, torch.Tensor], device: torch.device | str = "cpu"
) -> Whitening | None:
    """A whitening layer shaped as the one saved in `state_dict` (values loaded with it), or None."""
    if "whitening.mean" not in state_dict and "whitening.projection" not in state_dict:
        return None
    try:
        return Whitening(
            torch.zeros_like(state_dict["whitening.mean"]),
            torch.zeros_like(state_dict["whitening.projection"]),
        ).to(device)
    except (KeyError, TypeError, ValueError):
        raise DataError(
            "the state dict's whitening.mean (D,) and whitening.projection (d, D) are malformed"
        ) from None


def load_fine_tuned(path: str | Path) -> FineTuned:
    """Rebuild backbone, head and whitening from a checkpoint written by `hetretrieval-train`.

    The architecture is checked strictly before anything is built, and anything it names that the registries
    do not is refused; all weights (the input normalisation too) come from the state dict, loaded strictly.
    """
    path = Path(path).expanduser()
    checkpoint = read_torch_file(path, "checkpoint")
    if (
        not isinstance(checkpoint, dict)
        or checkpoint.get(ARCHITECTURE) is None
        or not isinstance(checkpoint.get("state_dict"), dict)
    ):
        raise DataError(
            f"checkpoint '{path}' has no model architecture: was it written by hetretrieval-train?"
        )
    try:
        architecture = _stored_architecture(checkpoint[ARCHITECTURE])
    except _Refused as refused:
        raise DataError(f"checkpoint '{path}' {refused}: refused") from None
    state = checkpoint["state_dict"]
    if not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise DataError(f"checkpoint '{path}' holds weights that are not tensors")
    head = architecture["head"]
    try:
        backbone = BACKBONE.build(**architecture["backbone"])
        parts = {
            "backbone": backbone,
            "head": HEADS[head["name"]].build(backbone, **head["options"]),
            "whitening": whitening_from_state(state),
        }
    except HetRetrievalError as error:
        raise DataError(f"checkpoint '{path}' describes no buildable model: {error}") from None
    for prefix, module in parts.items():
        weights = {
            key[len(prefix) + 1 :]: value
            for key, value in state.items()
            if type(key) is str and key.startswith(f"{prefix}.")
        }
        if module is None:
            if weights:
                raise DataError(
                    f"checkpoint '{path}' holds {prefix} weights {_short(sorted(weights))} but no whitening"
                )
            continue
        try:
            module.load_state_dict(weights, strict=True)
        except RuntimeError as error:  # missing, unexpected or misshapen weights
            detail = str(error).split("\n")[1].strip() if "\n" in str(error) else str(error)
            raise DataError(
                f"checkpoint '{path}' {prefix} weights do not fit its architecture: {detail}"
            ) from None
        module.eval()
    return FineTuned(parts["backbone"], parts["head"], parts["whitening"], architecture)
