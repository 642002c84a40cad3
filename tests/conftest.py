"""Shared fixtures: the real data beside the checkout (skipped cleanly when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

SHARED_DATA = Path(os.environ.get("HETRETRIEVAL_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")).resolve()


def _shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"shared data '{name}' not found at {path}")
    return path


@pytest.fixture(scope="session")
def pacs_root() -> Path:
    """`../shared/data/pacs-dev` (domain/class/image)."""
    return _shared("pacs-dev")


@pytest.fixture(scope="session")
def heritage_root() -> Path:
    """`../shared/data/heritage-wild` (40 images, labels.csv)."""
    return _shared("heritage-wild")


@pytest.fixture(scope="session")
def revisitop_root() -> Path:
    """`../shared/data/revisitop` (gnd_roxford5k.pkl, gnd_rparis6k.pkl)."""
    return _shared("revisitop")


TINY_BUILTIN = [
    "dataset=builtin", "dataset.photos=[astronaut,coffee,chelsea,rocket]", "dataset.variants_per_class=2",
    "dataset.image_size=64", "extraction.max_size=64",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache (generated benchmarks) for the whole test session."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def compose_eval(tmp_path, cache_dir):
    """Compose `conf/eval.yaml` with overrides, outputs in `tmp_path/run`, CSV logging (as the template's conftest)."""
    from hydra import compose, initialize_config_dir

    from hetretrieval.config import CONFIG_DIR

    def _compose(*overrides: str, config_name: str = "eval"):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name, overrides=[
                f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={cache_dir}", f"paths.data_dir={SHARED_DATA}",
                "logger=csv", "evaluation.report=false", *overrides])

    return _compose


@pytest.fixture
def offline_hub(monkeypatch):
    """timm as on a machine without network: asking for pretrained weights fails as the Hugging Face hub does."""
    import timm

    real_create = timm.create_model

    def offline_create(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to the Hub")
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create)


@pytest.fixture(autouse=True)
def no_leftover_hydra_run():
    """Hydra's run context is process-global: a test that sets it (as `compose_run` or an entry point's body
    does) must not leave it to the next test, whose own config it does not describe."""
    yield
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().cfg = None
