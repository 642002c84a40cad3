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
