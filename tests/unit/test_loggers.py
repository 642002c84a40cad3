"""W&B runs are finished with the outcome of the body: 0 on success, non-zero when it fails or is interrupted."""

from __future__ import annotations

from contextlib import nullcontext

import pytest

from hetretrieval.loggers import is_wandb, logged_run, override_labels


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


def test_override_labels_keep_only_what_differs_between_runs():
    runs = [["extraction.max_size=128", "pooling=gem", "paths.output_dir=/a"],
            ["extraction.max_size=224", "pooling=gem", "paths.output_dir=/b"]]
    assert override_labels(runs) == ["max_size=128", "max_size=224"]  # where results go never names a run
    assert override_labels([["dataset=pacs", "extraction.max_size=64", "logger=csv", "tags=[a]"]]) == \
        ["dataset=pacs,max_size=64"]  # a single run: all of its own
    # a key one run leaves at its default; last parts that clash keep their full keys
    assert override_labels([["+backbone.layer=3", "pooling.layer=1"], ["pooling.layer=2"]]) == \
        ["backbone.layer=3,pooling.layer=1", "backbone.layer=default,pooling.layer=2"]
    assert override_labels([["heads=[mac,gem]"], ["heads=[mac,gem]"]]) == ["", ""]


def test_build_loggers_tags_and_names_wandb_runs_outside_a_multirun(tmp_path):
    from omegaconf import OmegaConf

    from hetretrieval.errors import ConfigError
    from hetretrieval.loggers import build_loggers

    node = {"_target_": "pytorch_lightning.loggers.WandbLogger", "project": "hetretrieval-test", "offline": True,
            "save_dir": str(tmp_path), "group": "eval"}
    cfg = OmegaConf.create({"task_name": "eval", "tags": ["baseline", "pacs"], "logger": {"wandb": node}})
    (logger,) = build_loggers(cfg, "gem-pacs")
    assert (logger._wandb_init["name"], logger._wandb_init["group"]) == ("gem-pacs", "eval")
    assert logger._wandb_init["tags"] == ["baseline", "pacs"]
    assert "anonymous" not in logger._wandb_init  # unset: wandb would warn "no effect" on every run
    (logger,) = build_loggers(cfg, "gem-pacs", group="parent", head="gem")  # a head of a multi-head run
    assert (logger._wandb_init["name"], logger._wandb_init["group"]) == ("gem-pacs", "parent")
    cfg.tags = 3
    with pytest.raises(ConfigError, match="tags must be a list"):
        build_loggers(cfg, "gem-pacs")


def test_a_multirun_job_is_named_by_its_swept_overrides_only(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from hetretrieval.config import CONFIG_DIR
    from hetretrieval.loggers import MAX_FOLDER_NAME, multirun_group, sweep_label, sweep_subdir

    long_root = "/data/" + "x" * 200
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("eval", return_hydra_config=True, overrides=[
            "backbone.checkpoint=/w/a.pth", "dataset=folder", "dataset.root=/data/a"])
    # what the sweeper saved before launching: `-m backbone.checkpoint=/w/a.pth,/w/b.pth dataset=folder ...`
    OmegaConf.save({"hydra": {"overrides": {"task": ["backbone.checkpoint=/w/a.pth,/w/b.pth", "dataset=folder",
                                                     f"dataset.root=/data/a,{long_root}"]}}},
                   tmp_path / "multirun.yaml")
    with open_dict(cfg):
        cfg.hydra.mode, cfg.hydra.sweep.dir, cfg.hydra.job.num = "MULTIRUN", str(tmp_path), 1
    HydraConfig.instance().set_config(cfg)
    assert sweep_label() == "checkpoint=/w/a.pth,root=/data/a"  # dataset=folder is not swept
    assert sweep_subdir() == "1_checkpoint=_w_a.pth,root=_data_a"  # never a nested folder
    assert multirun_group(cfg) == f"eval-{tmp_path.name}"
    OmegaConf.set_readonly(cfg.hydra, False)  # set_config froze it
    cfg.hydra.overrides.task[2] = f"dataset.root={long_root}"
    HydraConfig.instance().set_config(cfg)
    subdir = sweep_subdir()
    assert len(subdir) == len("1_") + MAX_FOLDER_NAME and subdir.startswith("1_checkpoint=_w_a.pth,root=_data_x")
