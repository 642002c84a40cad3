"""Transformer backbones (random-init DINOv2 ViT-S/14): token maps, `cls`, the resize rule, layers, release
checkpoints; and cirtorch's multi-scale GeM (`extraction.scale_aggregation=gem`)."""

import pytest
import torch
import torch.nn.functional as F

from hetretrieval.config import ExtractionOptions, typed
from hetretrieval.errors import ConfigError, WeightsUnavailableError
from hetretrieval.models.backbones import (
    Backbone,
    patch_multiple_size,
    resize_to_patch_multiple,
    timm_layout,
)
from hetretrieval.models.network import RetrievalNetwork
from hetretrieval.models.pooling import functional as PF
from hetretrieval.models.pooling.heads import MAC, RMAC, ClassToken, GeM, SPoC
from hetretrieval.models.pooling.netvlad import NetVLAD

VIT, REG4 = "vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"


@pytest.fixture(scope="module")
def vit() -> Backbone:
    torch.manual_seed(0)
    return Backbone(VIT, pretrained=False).eval()


@pytest.fixture(scope="module")
def reg4() -> Backbone:
    """DINOv2 with 4 register tokens: 5 prefix tokens, and timm's layout differs from the release's."""
    torch.manual_seed(1)
    return Backbone(REG4, pretrained=False).eval()


def _normalised(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    return (images - backbone.mean) / backbone.std


@pytest.mark.parametrize("size", [(56, 84), (85, 128)])
def test_every_global_head_and_cls_on_a_vit(vit, size):
    heads = {"mac": MAC(), "spoc": SPoC(), "gem": GeM(), "rmac": RMAC(),
             "netvlad": NetVLAD.for_backbone(vit, n_clusters=4, dim=32), "cls": ClassToken()}
    network = RetrievalNetwork(vit, heads).eval()
    with torch.inference_mode():
        described = network(torch.rand(2, 3, *size))
    dims = {"mac": 384, "spoc": 384, "gem": 384, "rmac": 384, "netvlad": 4 * 32, "cls": 384}
    for name, descriptors in described.items():
        assert descriptors.shape == (2, dims[name]) and torch.isfinite(descriptors).all(), name
        torch.testing.assert_close(descriptors.norm(dim=1), torch.ones(2), msg=name)


@pytest.mark.parametrize("model_name", [VIT, REG4])
def test_token_map_and_cls_are_timms_forward_features(vit, reg4, model_name):
    backbone = vit if model_name == VIT else reg4
    images = torch.rand(2, 3, 70, 98)  # multiples of 14: no resize
    with torch.inference_mode():
        feature_map, class_token = backbone.features_and_class_token(images)
        tokens = backbone.model.forward_features(_normalised(backbone, images))
        cls = RetrievalNetwork(backbone, {"cls": ClassToken()})(images)["cls"]
    prefix = backbone.num_prefix_tokens
    assert prefix == (1 if model_name == VIT else 5)
    assert feature_map.shape == (2, 384, 5, 7) and backbone.out_channels == 384 and backbone.stride == 14
    torch.testing.assert_close(feature_map.flatten(2).transpose(1, 2), tokens[:, prefix:])
    torch.testing.assert_close(class_token, tokens[:, 0])
    torch.testing.assert_close(cls, F.normalize(tokens[:, 0], dim=1))


def test_patch_multiple_resize_rule(vit):
    assert patch_multiple_size(518, 700, 14) == (518, 700)
    assert patch_multiple_size(85, 128, 14) == (84, 126)  # 6.07 -> 6, 9.14 -> 9 patches
    assert patch_multiple_size(90, 111, 14) == (84, 112)  # 6.43 -> 6, 7.93 -> 8
    assert patch_multiple_size(7, 21, 14) == (14, 28)  # halves round up: 0.5 -> 1, 1.5 -> 2
    assert patch_multiple_size(3, 224, 16) == (16, 224)  # at least one patch
    images = torch.rand(1, 3, 70, 98)
    assert resize_to_patch_multiple(images, 14) is images
    odd = torch.rand(1, 3, 85, 128)
    resized = resize_to_patch_multiple(odd, 14)
    torch.testing.assert_close(resized, F.interpolate(odd, size=(84, 126), mode="bilinear", align_corners=False,
                                                      antialias=True))
    with torch.inference_mode():
        torch.testing.assert_close(vit(odd), vit(resized))
        assert vit(odd).shape == (1, 384, 6, 9)


def test_vit_block_layer_is_that_block_with_the_final_norm(vit):
    block = Backbone(VIT, pretrained=False, layer="blocks.7")
    block.load_state_dict(vit.state_dict())
    block.eval()
    assert Backbone(VIT, pretrained=False, layer=7).layer_index == block.layer_index == 7
    images = torch.rand(1, 3, 56, 70)
    model = vit.model
    with torch.inference_mode():
        feature_map, class_token = block.features_and_class_token(images)
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(_normalised(vit, images)))))
        for layer in model.blocks[:8]:
            x = layer(x)
        x = model.norm(x)
    torch.testing.assert_close(feature_map.flatten(2).transpose(1, 2), x[:, 1:])
    torch.testing.assert_close(class_token, x[:, 0])


def test_cnn_stage_layer_and_its_facts_come_from_feature_info():
    backbone = Backbone("resnet18", pretrained=False, layer="layer3").eval()
    assert (backbone.out_channels, backbone.stride) == (256, 16)
    assert Backbone("resnet18", pretrained=False, layer=-2).layer_index == 3
    assert (Backbone("resnet18", pretrained=False).out_channels, Backbone("resnet18", pretrained=False).stride) \
        == (512, 32)
    captured = {}
    backbone.model.layer3.register_forward_hook(lambda module, inputs, output: captured.update(map=output))
    images = torch.rand(1, 3, 64, 96)
    with torch.inference_mode():
        feature_map = backbone(images)
        backbone.model(_normalised(backbone, images))
    torch.testing.assert_close(feature_map, captured["map"])
    with pytest.raises(ConfigError, match="not a feature layer of resnet18.*layer1, layer2"):
        Backbone("resnet18", pretrained=False, layer="layer5")


def _release_layout(state: dict) -> dict:
    """timm's DINOv2 state dict in the original release's layout (`dinov2_vits14[_reg4]_pretrain.pth`): the
    inverse of timm's conversion (`mask_token` added; with registers, `register_tokens` and the class token's
    position embedding back inside `pos_embed`)."""
    release = {key: value for key, value in state.items() if key not in ("reg_token", "cls_token", "pos_embed")}
    release["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])  # DINOv2's iBOT mask; timm has none
    if "reg_token" in state:  # timm's reg4 models give the prefix tokens no position embedding
        offset = torch.randn(1, 1, state["cls_token"].shape[-1])
        release["register_tokens"] = state["reg_token"]
        release["pos_embed"] = torch.cat([offset, state["pos_embed"]], dim=1)
        release["cls_token"] = state["cls_token"] - offset
    else:
        release["pos_embed"], release["cls_token"] = state["pos_embed"], state["cls_token"]
    return release


@pytest.mark.parametrize("model_name", [VIT, REG4])
def test_dinov2_release_checkpoint_loads_strict(vit, reg4, model_name, tmp_path):
    source = vit if model_name == VIT else reg4
    state = source.model.state_dict()
    release = _release_layout(state)
    assert "mask_token" in release and "reg_token" not in release
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(release, path)
    backbone = Backbone(model_name, pretrained=False, checkpoint=str(path)).eval()
    backbone.model.load_state_dict(timm_layout(release, backbone.model), strict=True)
    for key, value in state.items():
        torch.testing.assert_close(backbone.model.state_dict()[key], value, msg=key)
    images = torch.rand(1, 3, 42, 56)
    with torch.inference_mode():
        torch.testing.assert_close(backbone(images), source(images))


def test_input_normalisation_comes_from_the_pretrained_config():
    eva_clip = Backbone("eva02_tiny_patch14_224.mim_in22k", pretrained=False)  # EVA-02: CLIP's statistics
    torch.testing.assert_close(eva_clip.mean.flatten(), torch.tensor([0.48145466, 0.4578275, 0.40821073]))
    with torch.inference_mode():
        feature_map, class_token = eva_clip.eval().features_and_class_token(torch.rand(1, 3, 56, 56))
    assert feature_map.shape == (1, 192, 4, 4) and class_token.shape == (1, 192)


def test_tagged_names_and_weights_errors(offline_hub):
    assert Backbone(f"{VIT}.lvd142m", pretrained=False).out_channels == 384
    with pytest.raises(ConfigError, match="no pretrained tag"):
        Backbone(f"{VIT}.nosuchtag", pretrained=False)
    with pytest.raises(WeightsUnavailableError) as error:
        Backbone(f"{VIT}.lvd142m", pretrained=True)
    message = str(error.value)
    assert "\n" not in message and "backbone.checkpoint=" in message and "dinov2_vits14_pretrain.pth" in message
    assert "efficientnet_lite0" in message


def test_cls_needs_a_class_token():
    with pytest.raises(ConfigError, match="reads the class token.*resnet18"):
        RetrievalNetwork(Backbone("resnet18", pretrained=False), {"cls": ClassToken()})
    with pytest.raises(ConfigError, match="class token"):
        ClassToken()(torch.rand(1, 8, 2, 2))


# --- multi-scale aggregation ------------------------------------------------------------------------------


class _ReluConv(torch.nn.Module):
    """A tiny deterministic backbone: a 3x3 conv and ReLU."""

    out_channels = 6

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(3, 6, 3, stride=2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images).relu()


def test_cirtorch_multiscale_gem_against_a_hand_computation():
    backbone, scales, p = _ReluConv().eval(), (1.0, 0.7071, 0.5), 4.0
    images = torch.rand(2, 3, 40, 52)
    network = RetrievalNetwork(backbone, {"gem": GeM(p=p), "mac": MAC()}, scales, scale_aggregation="gem")
    with torch.inference_mode():
        described = network(images)
        per_scale = {"gem": [], "mac": []}
        for scale in scales:
            scaled = images if scale == 1 else F.interpolate(
                images, size=(round(40 * scale), round(52 * scale)), mode="bilinear", align_corners=False,
                antialias=True)
            x = backbone(scaled)
            per_scale["gem"].append(F.normalize(x.clamp(min=1e-6).pow(p).mean(dim=(-2, -1)).pow(1 / p), dim=1))
            per_scale["mac"].append(F.normalize(x.amax(dim=(-2, -1)), dim=1))
    # cirtorch extract_ms: v = sum_s d_s^msp / S, v = v^(1/msp), v / ||v||, msp = GeM's p (1 for the rest)
    gem = (sum(d.pow(p) for d in per_scale["gem"]) / len(scales)).pow(1 / p)
    torch.testing.assert_close(described["gem"], gem / gem.norm(dim=1, keepdim=True))
    mac = sum(per_scale["mac"]) / len(scales)
    torch.testing.assert_close(described["mac"], mac / mac.norm(dim=1, keepdim=True))
    mean = RetrievalNetwork(backbone, {"gem": GeM(p=p)}, scales)(images)["gem"]  # the default: mean
    torch.testing.assert_close(mean, PF.aggregate_scales(per_scale["gem"]))
    assert not torch.allclose(mean, described["gem"])
    torch.testing.assert_close(PF.power_mean_scales(per_scale["mac"], 1.0), described["mac"])


def test_scale_aggregation_is_checked():
    from omegaconf import OmegaConf

    with pytest.raises(ConfigError, match="extraction.scale_aggregation"):
        typed(OmegaConf.create({"scale_aggregation": "max"}), ExtractionOptions, "extraction")
    with pytest.raises(ConfigError, match="scale_aggregation must be one of mean, gem"):
        RetrievalNetwork(_ReluConv(), {"gem": GeM()}, scale_aggregation="max")
