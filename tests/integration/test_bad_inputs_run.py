"""Issue 10, run layer: bad options stop a run before any weight or image is read; a run folder never mixes two
runs; unwritable folders, full disks and broken runs are one line; corrupt training images, empty debug batches
and interrupted W&B runs are handled; a failed run's log says why."""

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from PIL import Image

import hetretrieval.cli.train as train_cli
from conftest import TINY_BUILTIN
from hetretrieval.cli.analyze import analyze
from hetretrieval.cli.evaluate import evaluate
from hetretrieval.config import CONFIG_DIR
from hetretrieval.errors import ConfigError, DataError
from hetretrieval.evaluation.run_files import LOCK
from hetretrieval.extraction.batching import ImagePlan, ImageSource

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture
def nothing_read(monkeypatch):
    """Fail the test if a backbone's weights are loaded, an image header is scanned or NetVLAD is prepared."""
    def forbidden(*args, **kwargs):
        raise AssertionError("weights or images were read before the error")

    monkeypatch.setattr("hetretrieval.models.backbones.create_timm_model", forbidden)
    monkeypatch.setattr(ImagePlan, "scan", forbidden)
    monkeypatch.setattr("hetretrieval.models.pooling.netvlad.NetVLAD.prepare", forbidden)


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize(("override", "key"), [
    ("evaluation.ks=[0]", "evaluation.ks"), ("evaluation.top_k=0", "evaluation.top_k"),
    ("extraction.batch_size=0", "extraction.batch_size"), ("extraction.max_size=3", "extraction.max_size"),
    ("extraction.scales=[]", "extraction.scales"), ("extraction.streams=0", "extraction.streams"),
    ("extraction.batch_pixels=0", "extraction.batch_pixels"),
    ("extraction.batch_size=0 pooling=netvlad", "extraction.batch_size"),
])
def test_bad_options_stop_the_run_before_any_weight_or_image_is_read(compose_eval, nothing_read, tmp_path,
                                                                     override, key):
    with pytest.raises(ConfigError) as error:
        evaluate(compose_eval(*TINY_BUILTIN, *override.split()))
    assert key in _one_line(error)
    assert not (tmp_path / "run").exists()  # not even the output folder was claimed


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".partial") or p.name == LOCK]


def test_rerunning_into_a_folder_moves_each_earlier_run_aside(compose_eval, tmp_path, monkeypatch):
    strftime = time.strftime
    monkeypatch.setattr("hetretrieval.evaluation.run_files.time.strftime",  # every run within one second
                        lambda fmt, *when: "20260101-000000" if fmt == "%Y%m%d-%H%M%S" else strftime(fmt, *when))
    run = tmp_path / "run"
    for pooling in ("gem", "mac", "spoc"):
        evaluate(compose_eval(*TINY_BUILTIN, f"pooling={pooling}"))
        assert _leftovers(run) == []  # no partial file, and the lock released
    aside = ["superseded-20260101-000000", "superseded-20260101-000000-2"]  # side by side, never nested
    assert sorted(p.parent.relative_to(run).as_posix() for p in run.rglob("summary.json")) == [".", *aside]
    folders = {"spoc": run, "gem": run / aside[0], "mac": run / aside[1]}
    for descriptor, folder in folders.items():
        assert json.loads((folder / "summary.json").read_text())["descriptor"] == descriptor
    # each folder holds its own run's descriptors
    assert len({np.load(folder / "descriptors.npy").tobytes() for folder in folders.values()}) == 3


def test_folder_locked_by_a_live_process_is_refused_in_one_line(compose_eval, nothing_read, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK).write_text(str(os.getppid()))
    with pytest.raises(DataError) as error:
        evaluate(compose_eval(*TINY_BUILTIN))
    assert f"in use by running process {os.getppid()}" in _one_line(error)
    assert (tmp_path / "run" / LOCK).read_text() == str(os.getppid())  # the holder keeps its lock


def test_stale_lock_of_a_dead_process_is_taken_over(compose_eval, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK).write_text(str(dead.pid))
    assert evaluate(compose_eval(*TINY_BUILTIN))["counts"]["described"] == 12
    assert _leftovers(tmp_path / "run") == []


def test_other_ranks_of_a_ddp_launch_leave_the_folder_to_rank_zero(compose_eval, tmp_path, monkeypatch):
    """Under a DDP launcher every rank runs `evaluate`: only rank 0 claims the folder, so rank 1 is not refused
    by rank 0's lock (nor moves rank 0's files aside)."""
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK).write_text(str(os.getppid()))  # rank 0, alive, holds the folder
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert evaluate(compose_eval(*TINY_BUILTIN, "cache=false"))["counts"]["described"] == 12
    assert (tmp_path / "run" / LOCK).read_text() == str(os.getppid())


def test_unwritable_output_folder_fails_at_start_up(compose_eval, nothing_read):
    with pytest.raises(DataError) as error:
        evaluate(compose_eval(*TINY_BUILTIN, "paths.output_dir=/proc/x"))
    assert "cannot write to the output folder '/proc/x'" in _one_line(error)


def test_full_disk_while_writing_results_is_one_line_and_leaves_no_summary(compose_eval, tmp_path, monkeypatch):
    run = tmp_path / "run"
    replace = os.replace

    def full_disk(source, target):
        if Path(target).name == "descriptors.npy":
            raise OSError(28, "No space left on device")
        replace(source, target)

    monkeypatch.setattr("hetretrieval.evaluation.run_files.os.replace", full_disk)
    with pytest.raises(DataError) as error:
        evaluate(compose_eval(*TINY_BUILTIN))
    assert "descriptors.npy (No space left on device)" in _one_line(error)
    assert not (run / "summary.json").exists() and _leftovers(run) == []


def test_sweep_names_and_skips_runs_whose_summary_is_broken(compose_eval, tmp_path, caplog):
    sweep = tmp_path / "multirun"
    for _ in range(2):  # a re-run job: its earlier results under superseded-*/ are not a run of the sweep
        evaluate(compose_eval(*TINY_BUILTIN, f"paths.output_dir={sweep / '0_gem'}"))
    for name, content in (("1_mac", ""), ("2_spoc", '{"mAP": 0.5, "desc')):  # killed / full disk mid-write
        shutil.copytree(sweep / "0_gem", sweep / name, ignore=shutil.ignore_patterns("superseded-*"))
        (sweep / name / "summary.json").write_text(content)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("analyze", overrides=["task=sweep", f"runs=[{sweep}]", f"output_dir={tmp_path / 'report'}",
                                            "bootstrap_resamples=100"])
    with caplog.at_level(logging.WARNING):
        paths = analyze(cfg)
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert len(skipped) == 2 and all("is broken" in m for m in skipped)
    assert {"1_mac", "2_spoc"} == {Path(m.split("'")[1]).name for m in skipped}
    assert "| class | n_queries | gem | Avg |" in paths["markdown"].read_text()


def _image_folder(root: Path, classes: int, per_class: int) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (48, 56, 3), np.uint8)).save(root / f"c{c}" / f"{i}.jpg")


def test_training_skips_and_lists_a_corrupt_image(tmp_path, cache_dir, monkeypatch):
    root = tmp_path / "images"
    _image_folder(root, classes=4, per_class=5)
    corrupt = root / "c0" / "4.jpg"  # in the training split (seed 0), not the held-out validation images
    corrupt.write_bytes(corrupt.read_bytes()[:200])  # a JPEG cut short
    build, built = train_cli.build_datamodule, []

    def keep(cfg):
        built.append(build(cfg))
        return built[-1]

    monkeypatch.setattr(train_cli, "build_datamodule", keep)
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[
            "dataset=folder", f"dataset.root={root}", "miner=batch_hard", "miner.classes_per_batch=3",
            "miner.images_per_class=2", "miner.batches_per_epoch=2", "training.image_size=32",
            "extraction.max_size=32", "backbone.pretrained=false", "validation.fraction=0.2", "~logger",
            "+trainer.fast_dev_run=true", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
            "test.off_the_shelf=false"])
    with open_dict(cfg):
        cfg.paths.output_dir, cfg.paths.log_dir = str(tmp_path / "run"), str(tmp_path / "logs")
        cfg.paths.cache_dir = str(cache_dir)
    report = train_cli.train(cfg)
    (datamodule,) = built
    assert list(datamodule.skipped) == [str(corrupt)] and "truncated" in datamodule.skipped[str(corrupt)].lower()
    assert len(datamodule.train_dataset) == 15 and report["test"] == {"fine_tuned": {}}


def test_crops_of_huge_scans_are_decoded_at_crop_scale():
    assert ImageSource(max_size=None, crop_size=224).decode_size(20000, 10000) == 448


def test_fast_debug_batch_without_a_scorable_query_prints_na(compose_eval, heritage_root, capsys):
    summary = evaluate(compose_eval("debug=fast", "dataset=heritage_wild", "evaluation.report=true"))
    assert summary["counts"]["evaluated_queries"] == 0 and summary["mAP"] is None
    assert "mAP n/a   class mAP n/a   mP@1 n/a" in capsys.readouterr().out


def test_fast_debug_report_fits_the_neighbours_saved(compose_eval, pacs_root, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        summary = evaluate(compose_eval("debug=fast", "dataset=pacs", "evaluation.report=true"))
    assert summary["counts"]["described"] < 6  # fewer neighbours than the report's usual 5 results per query
    assert not [r for r in caplog.records if "run report" in r.getMessage()]
    for name in ("figure4_best.png", "figure4_worst.png", "comparison.md"):
        assert (tmp_path / "run" / "report" / name).stat().st_size > 0


def test_failed_run_says_why_on_stderr_and_in_its_log(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    done = subprocess.run([sys.executable, "-m", "hetretrieval.cli.evaluate", "extraction.batch_size=0",
                           f"hydra.run.dir={tmp_path}"], cwd=PROJECT, env=env, capture_output=True, text=True,
                          timeout=120)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode != 0 and last.startswith("hetretrieval:") and "Traceback" not in done.stderr
    assert "extraction.batch_size" in last and last.removeprefix("hetretrieval: ") in (tmp_path / "eval.log").read_text()


def test_empty_test_datasets_override_disables_an_experiments_test_sets(monkeypatch):
    """`test.datasets={}` reaches `train` empty (Hydra alone merges `{}` into the experiment's test sets); the
    experiment's other options stay."""
    overrides = ["experiment=finetune_pacs", "test.datasets={}"]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)  # as `hetretrieval-train` gets it
    trained = []
    monkeypatch.setattr(train_cli, "train", lambda cfg: trained.append(cfg) or {"best_val/mAP": None})
    HydraConfig.instance().set_config(cfg)
    train_cli.main.__wrapped__(cfg)  # the entry point's body, without Hydra's launcher
    (cfg,) = trained
    assert cfg.test.datasets == {} and list(cfg.dataset.domains) == ["photo", "art_painting"]


def test_interrupted_evaluation_finishes_its_wandb_run_as_failed(compose_eval, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("hetretrieval.evaluation.run.log_run", interrupted)  # after the W&B run started
    with pytest.raises(KeyboardInterrupt):
        evaluate(compose_eval(*TINY_BUILTIN, "logger=wandb"))
    (debug_log,) = (tmp_path / "run").glob("wandb/offline-run-*/logs/debug.log")
    assert "got exitcode: 130" in debug_log.read_text()
    assert _leftovers(tmp_path / "run") == []
