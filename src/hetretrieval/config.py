"""Configuration: the project-root resolver, typed run options, and Hydra instantiation with clear errors.

Typed options (dataclasses) are merged with the composed config at start-up, so a wrong type or an unknown key
fails before any image is read; errors raised inside `_target_` constructors come out as one clear line.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    """How images become descriptors (checked at start-up, before any weight or image is read)."""

    max_size: int | None = 800  # longer side cap in pixels (the paper's 800); null keeps full resolution
    max_pixels: int | None = 250_000_000  # larger files are skipped unread (decompression bombs); null: no cap
    batch_size: int = 4  # images per batch, within one size bucket (benchmarks/extraction_throughput.py)
    num_workers: int = 0  # data-loading worker processes
    scales: list[float] = field(default_factory=lambda: [1.0])  # multi-scale extraction (e.g. [1, 0.707, 0.5])
    scale_aggregation: str = "mean"  # how per-scale descriptors combine: mean | gem (cirtorch's msp power mean)

    def __post_init__(self) -> None:
        _check(self.max_size is None or self.max_size >= 16, "extraction.max_size", "an integer >= 16 or null",
               self.max_size)
        _check(self.max_pixels is None or self.max_pixels >= 1, "extraction.max_pixels", "a positive integer or null",
               self.max_pixels)
        _check(self.batch_size >= 1, "extraction.batch_size", "an integer >= 1", self.batch_size)
        _check(self.num_workers >= 0, "extraction.num_workers", "an integer >= 0", self.num_workers)
        _check(bool(self.scales) and all(s > 0 for s in self.scales), "extraction.scales",
               "a non-empty list of positive numbers", self.scales)
        _check(self.scale_aggregation in ("mean", "gem"), "extraction.scale_aggregation", "mean or gem",
               self.scale_aggregation)


@dataclass
class ExpansionOptions:
    """αQE / DBA (Radenović et al., TPAMI 2018): each vector becomes the L2-normalised sum of itself and its
    top-`k` database neighbours, each weighted by `max(similarity, 0) ** alpha` (alpha 0: average QE)."""

    k: int = 2
    alpha: float = 3.0

    def check(self, key: str) -> None:
        _check(self.k >= 1, f"{key}.k", "an integer >= 1", self.k)
        _check(self.alpha >= 0, f"{key}.alpha", "a number >= 0", self.alpha)


@dataclass
class EvaluationOptions:
    """How rankings are scored and saved (checked at start-up)."""

    ks: list[int] = field(default_factory=lambda: [1, 5, 10])  # P@k / R@k cut-offs
    top_k: int = 100  # neighbours saved per query (neighbours.npy)
    max_batch_entries: int = 1 << 24  # similarities held at once while ranking (bounds memory)
    report: bool = True  # figures (best/worst classes), per-class heatmap, tag correlations under report/
    query_expansion: ExpansionOptions | None = None  # αQE {k, alpha} after the search; null: off
    dba: ExpansionOptions | None = None  # database-side augmentation {k, alpha}; null: off

    def __post_init__(self) -> None:
        _check(bool(self.ks) and all(k >= 1 for k in self.ks), "evaluation.ks", "a non-empty list of integers >= 1",
               self.ks)
        _check(self.top_k >= 1, "evaluation.top_k", "an integer >= 1", self.top_k)
        _check(self.max_batch_entries >= 1, "evaluation.max_batch_entries", "an integer >= 1",
               self.max_batch_entries)
        for key, expansion in (("query_expansion", self.query_expansion), ("dba", self.dba)):
            if expansion is not None:
                expansion.check(f"evaluation.{key}")

    @property
    def expands(self) -> bool:
        """Whether αQE or DBA changes the descriptors before the search."""
        return self.query_expansion is not None or self.dba is not None


def _check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"invalid config value at '{key}': expected {expected}, got {value!r}")


def typed(node: DictConfig, schema: type, section: str) -> Any:
    """Validate the config section `section` against a dataclass schema and return the typed object."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except ConfigError:
        raise
    except OmegaConfBaseException as error:
        if isinstance(error.__cause__, ConfigError):  # raised by the schema's own checks
            raise error.__cause__ from None
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


def empty_dict_overrides(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Empty every node that a command-line override sets to `{}`: Hydra merges a dict override into the
    composed node, so `test.datasets={}` alone would keep the test sets an experiment defines."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if not override.is_delete() and override.value() == {}:
            OmegaConf.update(cfg, override.key_or_group, {}, merge=False)


def compose_option(group: str, name: str, context: DictConfig) -> DictConfig:
    """Option `name` of config group `group` composed by Hydra exactly as `group=name` would be (its defaults
    and package), its interpolations (`${paths.cache_dir}`, `${seed}`) resolved against `context`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException

    try:
        if GlobalHydra.instance().is_initialized():
            composed = compose(overrides=[f"+{group}={name}"])
        else:
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                composed = compose(overrides=[f"+{group}={name}"])
    except MissingConfigException:
        options = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        raise ConfigError(f"unknown {group} option '{name}'; choose among {', '.join(options)}") from None
    scope = OmegaConf.create(OmegaConf.to_container(context, resolve=False))
    OmegaConf.set_struct(scope, False)
    scope[group] = composed[group]
    try:
        return OmegaConf.create(OmegaConf.to_container(scope[group], resolve=True))
    except OmegaConfBaseException as error:
        raise ConfigError(f"{group}={name}: {str(error).splitlines()[0]}") from None
