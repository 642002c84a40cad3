"""Backbones: real offline ImageNet weights, normalisation, and the weight-resolution errors."""

import pytest
import timm
import torch

from hetretrieval.data.builtin import load_skimage_photo
from hetretrieval.errors import ConfigError, WeightsUnavailableError
from hetretrieval.models.backbones import Backbone, create_timm_model

EGYPTIAN_CAT, TABBY, TIGER_CAT = 285, 281, 282


def test_offline_efficientnet_lite0_weights_recognise_a_cat():
    model, config = create_timm_model("tf_efficientnet_lite0", pretrained=True, checkpoint=None)
    assert config["mean"] == (0.5, 0.5, 0.5) and config["std"] == (0.5, 0.5, 0.5)
    image = torch.nn.functional.interpolate(load_skimage_photo("chelsea")[None], size=(224, 224), mode="bilinear")
    with torch.inference_mode():
        top = model.eval()((image - 0.5) / 0.5).softmax(-1).topk(3).indices[0].tolist()
    assert top[0] in {EGYPTIAN_CAT, TABBY, TIGER_CAT}


def test_backbone_gives_last_conv_map_and_normalises_inside():
    backbone = Backbone("tf_efficientnet_lite0").eval()
    with torch.inference_mode():
        features = backbone(torch.rand(1, 3, 96, 128))
    assert features.shape == (1, backbone.out_channels, 3, 4) and backbone.out_channels == 1280
    torch.testing.assert_close(backbone.mean.flatten(), torch.full((3,), 0.5))


def test_checkpoint_round_trip(tmp_path):
    model = timm.create_model("resnet18", pretrained=False)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "r18.pth")
    backbone = Backbone("resnet18", checkpoint=str(tmp_path / "r18.pth"))
    torch.testing.assert_close(backbone.model.conv1.weight, model.conv1.weight)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsUnavailableError, match="does not fit"):
        Backbone("resnet18", checkpoint=str(tmp_path / "bad.pth"))


def test_no_network_gives_one_line_with_both_ways_out(offline_hub):
    with pytest.raises(WeightsUnavailableError) as error:
        Backbone("resnet18", pretrained=True)
    message = str(error.value)
    assert "\n" not in message and "backbone.checkpoint=" in message and "efficientnet_lite0" in message


def test_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError, match="no model"):
        Backbone("resnet1O1")
