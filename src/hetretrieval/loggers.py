"""Experiment loggers of the entry points and the names of runs: built from the `logger` config group, W&B runs
closed with the outcome, and runs named after the command-line overrides that tell them apart.

A run is named by its overrides that differ from its siblings' (`max_size=128` vs `max_size=224`): in a
multirun, the overrides its sweep varies (read back from the sweep's `multirun.yaml`, so that every launcher's
jobs, in-process or not, see the same sweep); among saved runs, the saved overrides that differ. The same name
is the job's folder (`<job number>_<name>`), its W&B run name and its column in comparison tables.

W&B is only ever touched through the logger objects, so importing this module imports neither wandb nor
Lightning's loggers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from hetretrieval.config import instantiate
from hetretrieval.errors import ConfigError

INTERRUPTED = 130  # the shell's exit status for SIGINT (Ctrl-C), which Python raises as KeyboardInterrupt
# overrides that say where results go or how they are labelled, not what they are: never part of a run's name
UNNAMED_OVERRIDES = ("paths", "hydra", "logger", "cache", "tags", "dataset.cache_dir")
MAX_FOLDER_NAME = 120  # characters of a job folder's name (longer: cut, with a digest of the whole name)


def build_loggers(cfg: DictConfig, run_name: str, save_dir: str | None = None, group: str | None = None,
                  head: str | None = None) -> list:
    """Instantiate every logger of the `logger` group, W&B runs tagged with `cfg.tags`.

    A W&B run is named `run_name` (e.g. descriptor and dataset) and grouped under `group` (the parent run of
    several heads), except in a multirun: there every run is named after its swept overrides (`head` appended
    for one head of several) and all runs of the multirun share one group. `save_dir` puts the loggers' files
    elsewhere than the config says (one folder per head of a multi-head run). Every logger receives the tags
    with the run's hyperparameters (the whole config).
    """
    label = sweep_label()
    if label:
        run_name = f"{label}/{head}" if head else label
    group = multirun_group(cfg) or group
    tags = run_tags(cfg)
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        wandb = node.get("_target_", "").endswith("WandbLogger")
        options = {"name": run_name} if wandb and not node.get("name") else {}
        if save_dir is not None:
            options["save_dir"] = save_dir
        if wandb and group is not None:
            options["group"] = group
        if wandb and tags and not node.get("tags"):
            options["tags"] = tags
        logger = instantiate(node, **options)
        if wandb and getattr(logger, "_wandb_init", {}).get("anonymous", False) is None:
            # Lightning always passes `anonymous`, even unset; wandb >= 0.2x then warns on every run
            del logger._wandb_init["anonymous"]
        loggers.append(logger)
    return loggers


def run_tags(cfg: DictConfig) -> list[str]:
    """`tags=[...]` (as in lightning-hydra-template): a list of strings, a single string being one tag."""
    tags = cfg.get("tags") or []
    if isinstance(tags, str):
        return [tags]
    if not OmegaConf.is_list(tags) and not isinstance(tags, list | tuple):
        raise ConfigError(f"tags must be a list of strings, e.g. tags=[baseline,pacs]; got {tags!r}")
    return [str(tag) for tag in tags]


def _parse(overrides: Sequence[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(overrides))


def _named(key: str) -> bool:
    return not any(key == k or key.startswith(f"{k}.") for k in UNNAMED_OVERRIDES)


def override_values(overrides: Sequence[str]) -> dict[str, str]:
    """`key=value` command-line overrides as `{key: value}` (`+`/`~` dropped from keys), without those that
    only say where results go (`UNNAMED_OVERRIDES`)."""
    return {o.key_or_group: o.get_value_element_as_str() for o in _parse(overrides) if _named(o.key_or_group)}


def override_labels(runs: Sequence[Sequence[str]]) -> list[str]:
    """One label per run from its overrides: `key=value,...` of the keys whose values differ between the runs
    (for a single run: all of its own), in command-line order; a key a run does not override reads `default`.
    Keys are shortened to their last part where that tells them apart (`extraction.max_size` -> `max_size`);
    a label is empty where no override tells the run apart."""
    values = [override_values(overrides) for overrides in runs]
    keys = list(dict.fromkeys(key for run in values for key in run))
    if len(values) > 1:
        keys = [key for key in keys if len({run.get(key) for run in values}) > 1]
    last = [key.rsplit(".", 1)[-1] for key in keys]
    short = [name if last.count(name) == 1 else key for key, name in zip(keys, last, strict=True)]
    return [",".join(f"{name}={run.get(key, 'default')}" for key, name in zip(keys, short, strict=True))
            for run in values]


def _hydra():
    """The running Hydra job's config, or None (composed outside a Hydra run: tests, notebooks)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def task_overrides() -> list[str]:
    """The running Hydra job's task overrides (what its command line, or its sweep, set); [] outside Hydra."""
    hydra = _hydra()
    return [str(o) for o in hydra.overrides.task] if hydra is not None else []


def _swept_keys(hydra) -> set[str]:
    """The keys a multirun sweeps over: its swept command-line overrides and `hydra.sweeper.params`, as the
    sweeper saved them to `multirun.yaml` before launching any job (empty if that file is missing)."""
    saved = Path(str(hydra.sweep.dir)) / "multirun.yaml"
    if not saved.is_file():
        return set()
    sweep = OmegaConf.load(saved).hydra
    given = [str(o) for o in sweep.overrides.task]
    given += [f"{key}={value}" for key, value in (OmegaConf.select(sweep, "sweeper.params") or {}).items()]
    return {o.key_or_group for o in _parse(given) if o.is_sweep_override()}


def _multirun(hydra) -> bool:
    from hydra.types import RunMode

    return hydra is not None and hydra.mode == RunMode.MULTIRUN


def sweep_label() -> str | None:
    """The running multirun job's name: its values of the swept keys (`max_size=128,pooling=gem`), or all of
    its task overrides when nothing is swept; None outside a multirun."""
    hydra = _hydra()
    if not _multirun(hydra):
        return None
    overrides = task_overrides()
    swept = _swept_keys(hydra)
    if swept:
        overrides = [o.input_line for o in _parse(overrides) if o.key_or_group in swept]
    return override_labels([overrides])[0]


def sweep_subdir() -> str:
    """A multirun job's folder under the sweep: `<job number>_<sweep label>` (numbered, so never shared and
    listed in sweep order), path separators replaced and an over-long name cut (a digest keeps it unique)."""
    hydra = _hydra()
    if hydra is None:
        raise ConfigError("sweep_subdir names the folder of a Hydra multirun job: it needs a running Hydra job")
    label = (sweep_label() or "").replace("/", "_").replace("\\", "_")
    if len(label) > MAX_FOLDER_NAME:
        label = f"{label[:MAX_FOLDER_NAME - 9]}-{hashlib.sha1(label.encode()).hexdigest()[:8]}"
    return f"{hydra.job.num}_{label}" if label else str(hydra.job.num)


def multirun_group(cfg: DictConfig) -> str | None:
    """The W&B group shared by every run of the running multirun (`<task_name>-<sweep folder>`); else None."""
    hydra = _hydra()
    if not _multirun(hydra):
        return None
    return f"{cfg.get('task_name', 'run')}-{Path(str(hydra.sweep.dir)).name}"


def is_wandb(logger: object) -> bool:
    """Whether `logger` is (a subclass of) Lightning's `WandbLogger`, told by class name so as not to import wandb."""
    return any(cls.__name__ == "WandbLogger" for cls in type(logger).__mro__)


def exit_code(error: BaseException | None) -> int:
    """The process exit status that `error` (None: success) stands for, as W&B's `Run.finish` expects it."""
    if error is None:
        return 0
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(error, SystemExit):
        return error.code if isinstance(error.code, int) else int(error.code is not None)
    return 1


@contextmanager
def logged_run(loggers: list) -> Iterator[list]:
    """Run the body, then finish every started W&B run with its outcome (see :func:`exit_code`) and re-raise.

    Finishing each run also makes each run of a multirun its own, complete W&B run; a run finished without an
    exit code would show as a success in W&B even when the body was interrupted or failed.
    """
    try:
        yield loggers
    except BaseException as error:
        _finish(loggers, exit_code(error))
        raise
    _finish(loggers, 0)


def _finish(loggers: list, code: int) -> None:
    for logger in loggers:
        if is_wandb(logger) and logger._experiment is not None:  # a run never started is not created to finish it
            logger.experiment.finish(exit_code=code)
