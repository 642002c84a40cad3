"""Every option of every config group composes, and every `_target_` it names resolves."""

from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from hetretrieval.config import CONFIG_DIR, instantiate

EVAL_GROUPS = sorted(next(iter(entry)) for entry in OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "eval.yaml"))[
    "defaults"] if isinstance(entry, dict) and next(iter(entry)) != "hydra")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _targets(node):
    if OmegaConf.is_dict(node):
        if "_target_" in node:
            yield node["_target_"]
        for key in node:
            if not OmegaConf.is_missing(node, key) and OmegaConf.is_config(node[key]):
                yield from _targets(node[key])


@pytest.mark.parametrize("group,option", [(g, o) for g in EVAL_GROUPS for o in _options(g)])
def test_option_composes_with_the_eval_config(compose_eval, group, option):
    # experiments named finetune_* are fine-tuning experiments of `hetretrieval-train` (conf/train.yaml)
    config_name = "train" if group == "experiment" and option.startswith("finetune") else "eval"
    cfg = compose_eval(f"{group}={option}", config_name=config_name)
    for target in _targets(cfg):
        hydra.utils.get_object(target)


@pytest.mark.parametrize("option", _options("backbone"))
def test_every_backbone_builds_and_gives_a_feature_map(compose_eval, option):
    cfg = compose_eval(f"backbone={option}", "backbone.pretrained=false")
    backbone = instantiate(cfg.backbone).eval()
    with torch.inference_mode():
        features = backbone(torch.rand(1, 3, 64, 64))
    assert features.dim() == 4 and features.shape[1] == backbone.out_channels


def test_config_dir_is_the_repository_conf():
    assert CONFIG_DIR == Path(__file__).resolve().parents[1] / "conf"
