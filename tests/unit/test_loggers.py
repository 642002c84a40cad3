"""W&B runs are finished with the outcome of the body: 0 on success, non-zero when it fails or is interrupted."""

from __future__ import annotations

from contextlib import nullcontext

import pytest

from hetretrieval.loggers import is_wandb, logged_run


class WandbLogger:
    """Stands for Lightning's `WandbLogger` (same class name): records the exit codes its run is finished with."""

    def __init__(self, started: bool = True) -> None:
        self._experiment = self if started else None
        self.exit_codes: list[int] = []

    @property
    def experiment(self) -> WandbLogger:
        return self

    def finish(self, exit_code: int | None = None) -> None:
        self.exit_codes.append(exit_code)


class CSVLogger:
    def finish(self, exit_code: int | None = None) -> None:
        raise AssertionError("only W&B runs are finished")


@pytest.mark.parametrize(("error", "code"), [(None, 0), (RuntimeError("boom"), 1), (KeyboardInterrupt(), 130),
                                             (SystemExit(3), 3), (SystemExit("hetretrieval: bad"), 1)])
def test_wandb_runs_are_finished_with_the_exit_code_of_the_body(error, code):
    started, unstarted = WandbLogger(), WandbLogger(started=False)
    with pytest.raises(type(error)) if error else nullcontext(), logged_run([started, unstarted, CSVLogger()]):
        if error:
            raise error
    assert started.exit_codes == [code]
    assert unstarted.exit_codes == []  # a run never started is not created just to finish it


def test_wandb_is_told_by_class_name_including_subclasses():
    assert is_wandb(WandbLogger()) and is_wandb(type("Custom", (WandbLogger,), {})())
    assert not is_wandb(CSVLogger())


def test_interrupted_offline_wandb_run_records_a_non_zero_exit_code(tmp_path):
    from pytorch_lightning.loggers import WandbLogger as LightningWandbLogger

    logger = LightningWandbLogger(save_dir=str(tmp_path), project="hetretrieval-test", offline=True)
    with pytest.raises(KeyboardInterrupt), logged_run([logger]):
        logger.log_metrics({"loss": 1.0})
        raise KeyboardInterrupt
    (debug_log,) = tmp_path.glob("wandb/offline-run-*/logs/debug.log")
    assert "got exitcode: 130" in debug_log.read_text()
