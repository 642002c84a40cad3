"""Configuration: the project-root resolver, typed run options, and Hydra instantiation with clear errors.

Typed options (dataclasses) are merged with the composed config at start-up, so a wrong type or an unknown key
fails before any image is read; errors raised inside `_target_` constructors come out as one clear line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hetretrieval.errors import ConfigError, HetRetrievalError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = PROJECT_ROOT / "conf"

if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))


@dataclass
class ExtractionOptions:
    """How images become descriptors."""

    max_size: int | None = 800  # longer side cap in pixels (the paper's 800); null keeps full resolution
    batch_size: int = 4  # images per batch, within one size bucket (benchmarks/extraction_throughput.py)
    num_workers: int = 0  # data-loading worker processes
    scales: list[float] = field(default_factory=lambda: [1.0])  # multi-scale extraction (e.g. [1, 0.707, 0.5])


@dataclass
class EvaluationOptions:
    """How rankings are scored and saved."""

    ks: list[int] = field(default_factory=lambda: [1, 5, 10])  # P@k / R@k cut-offs
    top_k: int = 100  # neighbours saved per query (neighbours.npy)
    max_batch_entries: int = 1 << 24  # similarities held at once while ranking (bounds memory)
    report: bool = True  # figures (best/worst classes), per-class heatmap, tag correlations under report/


def typed(node: DictConfig, schema: type, section: str) -> Any:
    """Validate the config section `section` against a dataclass schema and return the typed object."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except OmegaConfBaseException as error:
        key = f"{section}.{error.full_key}" if getattr(error, "full_key", None) else section
        message = str(getattr(error, "msg", error)).split("\n")[0]
        raise ConfigError(f"invalid config value at '{key}': {message}") from None


def instantiate(node: DictConfig, **kwargs) -> Any:
    """`hydra.utils.instantiate` that surfaces our own errors (and missing `???` values) as themselves."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except Exception as error:
        cause = error
        while cause is not None:
            if isinstance(cause, HetRetrievalError):
                raise cause from None
            if isinstance(cause, OmegaConfBaseException):
                raise ConfigError(str(cause).split("\n")[0]) from None
            cause = cause.__cause__ or cause.__context__
        raise
