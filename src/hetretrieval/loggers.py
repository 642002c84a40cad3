"""Experiment loggers of the entry points: built from the `logger` config group, W&B runs closed with the outcome.

W&B is only ever touched through the logger objects, so importing this module imports neither wandb nor
Lightning's loggers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from omegaconf import DictConfig

from hetretrieval.config import instantiate

INTERRUPTED = 130  # the shell's exit status for SIGINT (Ctrl-C), which Python raises as KeyboardInterrupt


def build_loggers(cfg: DictConfig, run_name: str, save_dir: str | None = None, group: str | None = None) -> list:
    """Instantiate every logger of the `logger` group; W&B runs are named after the descriptor and dataset.

    `save_dir` puts the loggers' files elsewhere than the config says (one folder per head of a multi-head run);
    `group` gathers W&B runs under one parent (the heads of one run).
    """
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        wandb = node.get("_target_", "").endswith("WandbLogger")
        options = {"name": run_name} if wandb and not node.get("name") else {}
        if save_dir is not None:
            options["save_dir"] = save_dir
        if wandb and group is not None:
            options["group"] = group
        loggers.append(instantiate(node, **options))
    return loggers


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
