"""The one checkpoint reader: non-PyTorch files are one line, and fine-tuned checkpoints cannot name code."""

from __future__ import annotations

import dataclasses
import inspect
import json
import pathlib

import hydra
import pytest
import torch

from hetretrieval.errors import ConfigError, DataError, WeightsUnavailableError
from hetretrieval.models.backbones import Backbone
from hetretrieval.models.checkpoints import (
    BACKBONE,
    HEADS,
    architecture_from_config,
    load_fine_tuned,
    read_torch_file,
)
from hetretrieval.models.local.pipeline import load_attention_scorer
from hetretrieval.models.pooling.heads import GeM
from hetretrieval.models.pooling.netvlad import NetVLAD, NetVLADPreparation
from hetretrieval.models.whitening import Whitening
from hetretrieval.training.resume import checkpoint_wandb_run_id

BACKBONE_TARGET = "hetretrieval.models.backbones.Backbone"
GEM_TARGET = "hetretrieval.models.pooling.heads.GeM"
LEGACY_BACKBONE = {
    "_target_": BACKBONE_TARGET,
    "model_name": "resnet18",
    "pretrained": False,
    "checkpoint": None,
}
RESNET = {"model_name": "resnet18"}
GEM = {"name": "gem", "options": {"p": 3.0, "eps": 1e-6, "learn_p": True}}


def _state_dict(**modules: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.{key}": value
        for prefix, module in modules.items()
        if module is not None
        for key, value in module.state_dict().items()
    }


def _save(path: pathlib.Path, architecture, state_dict: dict) -> pathlib.Path:
    torch.save({"architecture": architecture, "state_dict": state_dict, "epoch": 3}, path)
    return path


@pytest.fixture(scope="module")
def resnet18() -> Backbone:
    torch.manual_seed(0)
    return Backbone("resnet18", pretrained=False).eval()


@pytest.fixture(scope="module")
def gem_state(resnet18) -> dict[str, torch.Tensor]:
    return _state_dict(backbone=resnet18, head=GeM())


# --- read_torch_file -------------------------------------------------------------------------------------


class _WritesAFile:
    """Pickles as a call of `Path.write_text`, as a malicious `.pth` does."""

    def __init__(self, target: pathlib.Path) -> None:
        self.target = target

    def __reduce__(self):
        return pathlib.Path.write_text, (self.target, "pwned")


def _not_weights(tmp_path: pathlib.Path, kind: str) -> pathlib.Path:
    path = tmp_path / f"{kind}.pth"
    if kind == "text":
        path.write_text("hi\n")
    elif kind == "empty":
        path.touch()
    elif kind in ("truncated", "truncated_legacy"):
        torch.save({"w": torch.randn(1000)}, path, _use_new_zipfile_serialization=kind == "truncated")
        path.write_bytes(path.read_bytes()[:-200])
    elif kind == "python_object":
        torch.save({"path": pathlib.Path("x")}, path)
    elif kind == "code":
        torch.save({"w": _WritesAFile(tmp_path / "pwned")}, path)
    return path


def _error(function, *args):
    with pytest.raises(Exception) as error:  # noqa: B017 (the callers raise their own classes)
        function(*args)
    return error.value


@pytest.mark.parametrize("kind", ["text", "empty", "truncated", "truncated_legacy", "python_object", "code"])
def test_read_torch_file_refuses_non_weights_in_one_line(tmp_path, kind):
    with pytest.raises(DataError) as error:
        read_torch_file(_not_weights(tmp_path, kind), "backbone checkpoint")
    message = str(error.value)
    assert message.startswith("backbone checkpoint '") and "is not a PyTorch weights file (" in message
    assert "weights_only" not in message and "\n" not in message
    assert not (tmp_path / "pwned").exists()


def test_read_torch_file_names_the_reason(tmp_path):
    reasons = {
        kind: str(_error(read_torch_file, _not_weights(tmp_path, kind), "file"))
        for kind in ("text", "empty", "truncated", "python_object", "code")
    }
    assert "neither a zip archive nor a pickle" in reasons["text"] and "empty" in reasons["empty"]
    assert "truncated or corrupt" in reasons["truncated"] and "pathlib.PosixPath" in reasons["python_object"]
    assert "not only tensors and plain values" in reasons["code"]


def test_read_torch_file_reads_weights_and_names_a_missing_file(tmp_path):
    torch.save({"w": torch.arange(3)}, tmp_path / "w.pt")
    assert torch.equal(read_torch_file(tmp_path / "w.pt", "weights")["w"], torch.arange(3))
    with pytest.raises(WeightsUnavailableError, match="^weights '.*absent.pt' does not exist$"):
        read_torch_file(tmp_path / "absent.pt", "weights", WeightsUnavailableError)


@pytest.mark.parametrize(
    ("read", "error_class"),
    [
        (lambda path: Backbone("resnet18", pretrained=False, checkpoint=str(path)), WeightsUnavailableError),
        (lambda path: load_attention_scorer(path, 8), DataError),
        (checkpoint_wandb_run_id, ConfigError),
        (
            lambda path: NetVLAD(12, 4, None, cache_path=path).init_from_features(
                torch.randn(50, 12), seed=0
            ),
            DataError,
        ),
        (load_fine_tuned, DataError),
    ],
    ids=["backbone", "attention", "resume", "netvlad_cache", "fine_tuned"],
)
def test_every_reader_of_user_files_says_text_is_not_weights(tmp_path, read, error_class):
    error = _error(read, _not_weights(tmp_path, "text"))
    assert type(error) is error_class, error
    assert "is not a PyTorch weights file" in str(error) and "weights_only" not in str(error)
    assert "\n" not in str(error)


# --- fine-tuned checkpoints ------------------------------------------------------------------------------


def _write_text(target: pathlib.Path) -> dict:
    return {
        "_target_": "pathlib.Path.write_text",
        "_args_": [{"_target_": "pathlib.Path", "_args_": [str(target)]}, "x"],
    }


MALICIOUS = {
    "write_text_head": lambda t: {"backbone": LEGACY_BACKBONE, "head": _write_text(t)},
    "open_head": lambda t: {
        "backbone": LEGACY_BACKBONE,
        "head": {"_target_": "builtins.open", "_args_": [str(t), "w"]},
    },
    "copyfile_head": lambda t: {
        "backbone": LEGACY_BACKBONE,
        "head": {"_target_": "shutil.copyfile", "_args_": [__file__, str(t)]},
    },
    "write_text_backbone": lambda t: {"backbone": _write_text(t), "head": {"_target_": GEM_TARGET, "p": 3.0}},
    "legacy_nested_target": lambda t: {
        "backbone": LEGACY_BACKBONE,
        "head": {"_target_": GEM_TARGET, "p": _write_text(t)},
    },
    "legacy_args": lambda t: {
        "backbone": LEGACY_BACKBONE,
        "head": {"_target_": GEM_TARGET, "_args_": [_write_text(t)]},
    },
    "legacy_backbone_partial": lambda t: {
        "backbone": {**LEGACY_BACKBONE, "_partial_": True},
        "head": {"_target_": GEM_TARGET},
    },
    "nested_target": lambda t: {
        "backbone": RESNET,
        "head": {"name": "gem", "options": {"p": _write_text(t)}},
    },
    "target_beside_model_name": lambda t: {
        "backbone": {"model_name": "resnet18", **_write_text(t)},
        "head": GEM,
    },
    "model_name_is_code": lambda t: {"backbone": {"model_name": _write_text(t)}, "head": GEM},
    "backbone_checkpoint": lambda t: {
        "backbone": {"model_name": "resnet18", "checkpoint": str(t)},
        "head": GEM,
    },
    "unknown_head": lambda t: {"backbone": RESNET, "head": {"name": "evil", "options": {}}},
    "unknown_option": lambda t: {"backbone": RESNET, "head": {"name": "gem", "options": {"_partial_": True}}},
    "head_target_key": lambda t: {"backbone": RESNET, "head": {**GEM, "_args_": [str(t)]}},
    "extra_part": lambda t: {"backbone": RESNET, "head": GEM, "whitening": _write_text(t)},
}


@pytest.mark.parametrize("craft", MALICIOUS.values(), ids=MALICIOUS.keys())
def test_a_checkpoint_naming_code_is_refused_in_one_line(tmp_path, gem_state, craft):
    target = tmp_path / "pwned"
    path = _save(tmp_path / "evil.ckpt", craft(target), gem_state)
    with pytest.raises(DataError) as error:
        load_fine_tuned(path)
    message = str(error.value)
    assert (
        message.startswith(f"checkpoint '{path}' ") and message.endswith(": refused") and "\n" not in message
    )
    assert not target.exists()


def test_gem_and_whitening_round_trip_to_identical_descriptors(tmp_path, resnet18):
    head, whitening = GeM(p=2.5, eps=1e-6), Whitening(torch.randn(512), torch.randn(64, 512))
    with torch.no_grad():
        head.p.fill_(2.8)  # trained away from its initial value
    architecture = architecture_from_config(
        {"_target_": BACKBONE_TARGET, "model_name": "resnet18", "pretrained": True, "checkpoint": None},
        {"_target_": GEM_TARGET, "p": 2.5, "eps": 1e-6},
    )
    assert architecture == {"backbone": RESNET, "head": {"name": "gem", "options": {"p": 2.5, "eps": 1e-6}}}
    state = {
        **_state_dict(backbone=resnet18, head=head, whitening=whitening),
        "loss.margin": torch.tensor(0.7),
    }
    loaded = load_fine_tuned(_save(tmp_path / "ft.ckpt", architecture, state))
    images = torch.rand(2, 3, 64, 80)
    with torch.no_grad():
        expected = whitening(head(resnet18(images)))
        actual = loaded.whitening(loaded.head(loaded.backbone(images)))
    assert torch.equal(actual, expected) and actual.shape == (2, 64)
    assert loaded.architecture == architecture and not loaded.backbone.training


def test_netvlad_round_trips(tmp_path, resnet18):
    head = NetVLAD.for_backbone(resnet18, n_clusters=4, dim=16)
    architecture = {"backbone": RESNET, "head": {"name": "netvlad", "options": {"n_clusters": 4, "dim": 16}}}
    loaded = load_fine_tuned(
        _save(tmp_path / "ft.ckpt", architecture, _state_dict(backbone=resnet18, head=head))
    )
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.head(loaded.backbone(images)), head(resnet18(images)))
    assert loaded.whitening is None


def test_legacy_architecture_of_registered_classes_is_converted(tmp_path, gem_state):
    legacy = {
        "backbone": {**LEGACY_BACKBONE, "pretrained": True, "checkpoint": str(tmp_path / "never-read.pth")},
        "head": {"_target_": GEM_TARGET, **GEM["options"]},
    }
    loaded = load_fine_tuned(_save(tmp_path / "old.ckpt", legacy, gem_state))
    assert loaded.architecture == {"backbone": RESNET, "head": GEM}
    assert isinstance(loaded.head, GeM)


def test_weights_that_do_not_fit_or_no_architecture_are_one_line(tmp_path, gem_state):
    mac = {"backbone": RESNET, "head": {"name": "mac", "options": {}}}
    with pytest.raises(DataError, match="head weights do not fit its architecture: Unexpected key"):
        load_fine_tuned(_save(tmp_path / "mac.ckpt", mac, gem_state))
    torch.save({"state_dict": gem_state}, tmp_path / "plain.ckpt")
    with pytest.raises(DataError, match="has no model architecture"):
        load_fine_tuned(tmp_path / "plain.ckpt")


@pytest.mark.parametrize(
    ("pooling", "head"),
    [
        ("gem", GEM),
        ("mac", {"name": "mac", "options": {}}),
        ("spoc", {"name": "spoc", "options": {}}),
        ("rmac", {"name": "rmac", "options": {"levels": 3, "overlap": 0.4}}),
        ("netvlad", {"name": "netvlad", "options": {"n_clusters": 64, "dim": 512}}),
    ],
)
def test_architecture_from_composed_config(compose_eval, pooling, head):
    cfg = compose_eval(f"pooling={pooling}")
    architecture = architecture_from_config(cfg.backbone, cfg.pooling)
    assert architecture == {"backbone": {"model_name": "tf_efficientnet_lite0"}, "head": head}
    assert json.loads(json.dumps(architecture)) == architecture


def test_poolings_a_checkpoint_cannot_name_are_config_errors(compose_eval):
    cfg = compose_eval("pooling=delf")
    with pytest.raises(
        ConfigError, match="cannot fine-tune pooling 'hetretrieval.models.local.pipeline.DelfExtractor'"
    ):
        architecture_from_config(cfg.backbone, cfg.pooling)
    with pytest.raises(ConfigError, match="option 'p' with a str value"):
        architecture_from_config(cfg.backbone, {"_target_": GEM_TARGET, "p": "three"})


def test_registered_options_are_constructor_parameters():
    for name, component in {"backbone": BACKBONE, **HEADS}.items():
        target = hydra.utils.get_object(component.target)
        parameters = set(inspect.signature(target).parameters)
        if name == "netvlad":
            parameters |= {f.name for f in dataclasses.fields(NetVLADPreparation)}
        else:
            assert name == "backbone" or name == target.name
        assert set(component.options) | set(component.config_only) <= parameters, name
