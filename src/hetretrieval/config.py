"""Configuration: where the configs are (checkout or wheel), path resolvers, typed run options, and Hydra
instantiation with clear errors.

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

PACKAGE_DIR = Path(__file__).resolve().parent
# a wheel ships the repository's conf/ inside the package (pyproject.toml: package-dir `hetretrieval.conf`); a
# checkout (editable install) reads its own conf/, so that edits show up
_PACKAGED = (PACKAGE_DIR / "conf").is_dir()
PROJECT_ROOT: Path | None = None if _PACKAGED else PACKAGE_DIR.parents[1]
CONFIG_DIR = PACKAGE_DIR / "conf" if _PACKAGED else PACKAGE_DIR.parents[1] / "conf"

if not OmegaConf.has_resolver("project_root"):  # paths.root_dir: the checkout, else the current directory
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT or Path.cwd()))
if not OmegaConf.has_resolver("cwd"):  # paths.log_dir / cache_dir: where the command runs
    OmegaConf.register_new_resolver("cwd", lambda: str(Path.cwd()))


def _sweep_subdir() -> str:
    from hetretrieval.loggers import sweep_subdir  # loggers imports this module

    return sweep_subdir()


if not OmegaConf.has_resolver("sweep_subdir"):  # hydra.sweep.subdir: `<job number>_<swept overrides>`
    OmegaConf.register_new_resolver("sweep_subdir", _sweep_subdir)


def _config_groups(choices: DictConfig) -> str:
    """`--help`'s list of the config groups a command reads (its defaults list, and the groups its options select,
    as `pooling@rerank.local`; Hydra's own left out): one line each, `group  chosen option  every option`."""
    chosen = {g: c for g, c in choices.items() if g != "hydra" and not g.startswith("hydra/")}
    width = max(map(len, chosen), default=0)
    lines = []
    for group, option in sorted(chosen.items()):
        options = sorted(p.stem for p in (CONFIG_DIR / group.split("@")[0]).glob("*.yaml"))
        lines.append(f"  {group:<{width}}  {'null' if option is None else option:<20} {', '.join(options)}")
    return "\n".join(lines)


if not OmegaConf.has_resolver("config_groups"):  # hydra.help.template (conf/hydra/help/hetretrieval.yaml)
    OmegaConf.register_new_resolver("config_groups", _config_groups)


@dataclass
class ExtractionOptions:
    """How images become descriptors (checked at start-up, before any weight or image is read)."""

    max_size: int | None = 800  # longer side cap in pixels (the paper's 800); null keeps full resolution
    max_pixels: int | None = 250_000_000  # larger files are skipped unread (decompression bombs); null: no cap
    # images per batch, within one size bucket, and at most `batch_pixels` pixels (images x height x width; a
    # batch holds at least one image): small images batch up, large ones go one by one. On the 2-core CPU
    # (benchmarks/extraction_throughput.py --batch-size 1 4) batches of 4 described pacs-dev (227 px) 1.12-1.13x
    # faster than batches of 1 at 1 thread, 1.23-1.24x at 2; uncapped at 512 px (heritage-wild, mostly single
    # images of a size) they ran 0.84-0.95x, capped as batches of 1. Raise both on a GPU
    batch_size: int = 4
    batch_pixels: int | None = 262_144  # 512 x 512; null: only batch_size bounds a batch
    num_workers: int = 0  # data-loading worker processes
    # concurrent forward passes on the CPU, torch's threads shared out among them; null: one per torch thread,
    # at most 4 (2 cores: two 1-thread streams described pacs-dev 1.15-1.16x and heritage-wild 1.47x faster than
    # one 2-thread pass, bit for bit as at 1 thread; benchmarks/extraction_throughput.py). An accelerator runs one.
    streams: int | None = None
    scales: list[float] = field(default_factory=lambda: [1.0])  # multi-scale extraction (e.g. [1, 0.707, 0.5])
    scale_aggregation: str = "mean"  # how per-scale descriptors combine: mean | gem (cirtorch's msp power mean)
    # exact: batches of one image size (descriptors never depend on batching); aspect: each image resized to the
    # nearest of a few shapes per aspect ratio, sides multiples of the backbone's stride, so batches fill (the
    # GPU path for mixed-size archives; descriptors move: cosine to exact, heritage-wild at 256 px, stride 32:
    # median 0.949, min 0.731 over 40 images; tests/integration/test_extraction_numerics.py bounds 0.93 / 0.70)
    bucketing: str = "exact"
    precision: str = "32"  # 32 | bf16 | 16: autocast of the network (16 on a CPU falls back to bf16, logged once)
    # NHWC network and batches (convolutions on GPUs' tensor cores; on this 2-core CPU EfficientNet-Lite0 extraction
    # ran 1.04-1.06x faster in 2 streams). Off by default: descriptors move (within 1e-5) and so does the store key
    channels_last: bool = False
    pin_memory: bool = True  # pinned host batches when a CUDA device is present

    def __post_init__(self) -> None:
        _check(self.max_size is None or self.max_size >= 16, "extraction.max_size", "an integer >= 16 or null",
               self.max_size)
        _check(self.max_pixels is None or self.max_pixels >= 1, "extraction.max_pixels", "a positive integer or null",
               self.max_pixels)
        _check(self.batch_size >= 1, "extraction.batch_size", "an integer >= 1", self.batch_size)
        _check(self.batch_pixels is None or self.batch_pixels >= 1, "extraction.batch_pixels",
               "a positive integer or null", self.batch_pixels)
        _check(self.num_workers >= 0, "extraction.num_workers", "an integer >= 0", self.num_workers)
        _check(self.streams is None or self.streams >= 1, "extraction.streams", "an integer >= 1 or null",
               self.streams)
        _check(bool(self.scales) and all(s > 0 for s in self.scales), "extraction.scales",
               "a non-empty list of positive numbers", self.scales)
        _check(self.scale_aggregation in ("mean", "gem"), "extraction.scale_aggregation", "mean or gem",
               self.scale_aggregation)
        _check(self.bucketing in ("exact", "aspect"), "extraction.bucketing", "exact or aspect", self.bucketing)
        _check(self.precision in ("32", "bf16", "16"), "extraction.precision", "32, bf16 or 16", self.precision)


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
    # global search: exact (every positive ranked) | ivfpq | hnsw (faiss short-list, exactly re-scored; AP over it)
    search: str = "exact"
    shortlist: int = 1000  # ivfpq / hnsw: candidates per query, re-scored exactly (covers top_k and every k)
    ivf_lists: int | None = None  # ivfpq: inverted lists; null: min(4 sqrt(N), N / 39)
    pq_m: int | None = None  # ivfpq: code bytes a vector (a divisor of D); null: the largest divisor <= D / 8
    nprobe: int | None = None  # ivfpq: lists visited per query; null: max(16, ivf_lists / 64)
    hnsw_m: int = 32  # hnsw: graph neighbours per vector
    ef_search: int | None = None  # hnsw: search breadth; null: 2 x shortlist (never below it)

    def __post_init__(self) -> None:
        _check(bool(self.ks) and all(k >= 1 for k in self.ks), "evaluation.ks", "a non-empty list of integers >= 1",
               self.ks)
        _check(self.top_k >= 1, "evaluation.top_k", "an integer >= 1", self.top_k)
        _check(self.max_batch_entries >= 1, "evaluation.max_batch_entries", "an integer >= 1",
               self.max_batch_entries)
        _check(self.search in ("exact", "ivfpq", "hnsw"), "evaluation.search", "exact, ivfpq or hnsw", self.search)
        _check(self.search == "exact" or self.shortlist >= max(self.top_k, *self.ks), "evaluation.shortlist",
               "an integer >= evaluation.top_k and every evaluation.ks", self.shortlist)
        for key in ("ivf_lists", "pq_m", "nprobe", "ef_search"):
            _check(getattr(self, key) is None or getattr(self, key) >= 1, f"evaluation.{key}",
                   "an integer >= 1 or null", getattr(self, key))
        _check(self.hnsw_m >= 2, "evaluation.hnsw_m", "an integer >= 2", self.hnsw_m)
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


def check_entry_point(cfg: DictConfig, entry_point: str) -> None:
    """Refuse an `experiment=` preset written for another command: each preset names its own (`entry_point`)."""
    meant = cfg.get("entry_point")
    if meant is not None and meant != entry_point:
        raise ConfigError(f"this experiment preset is for {meant}, not {entry_point}: run it as "
                          f"`{meant} experiment=...`")


def compose_run(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The config an entry point's run gets (`config_name`: eval, train, analyze, ...), composed without
    `hydra.main` (notebooks, scripts): Hydra's run context is set as a run would set it, so that
    `${hydra:runtime.output_dir}` and the run folder (`hydra.run.dir`, under `paths.log_dir`) resolve."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf import open_dict

    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(str(error).splitlines()[0]) from None
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(Path(cfg.hydra.run.dir).resolve())
        cfg.hydra.job.name = config_name
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
