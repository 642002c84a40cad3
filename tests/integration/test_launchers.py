"""Hydra launchers: a two-job multirun under `submitit_local` (a process per job) and `joblib` (parallel worker
processes) writes the plain launcher's results, in folders and W&B runs named after the swept override."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

PROJECT = Path(__file__).resolve().parents[2]
TINY = ["pooling=mac,gem", "logger=many_loggers", "dataset.photos=[astronaut,coffee,chelsea]",
        "dataset.variants_per_class=2", "dataset.image_size=64", "extraction.max_size=64", "cache=false",
        "evaluation.report=false", "trainer=cpu",  # submitit_local hides GPUs: every launcher on the CPU
        "tags=[${oc.env:HETRETRIEVAL_TEST_TAG}]"]  # resolved in each job's own process: the environment passes
RUNS = ["0_pooling=mac", "1_pooling=gem"]
PLUGINS = {"submitit_local": "hydra_plugins.hydra_submitit_launcher", "joblib": "hydra_plugins.hydra_joblib_launcher"}


def _multirun(sweep: Path, cache: Path, *launcher: str) -> Path:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1",
           "HETRETRIEVAL_TEST_TAG": "from-env"}
    done = subprocess.run([sys.executable, "-m", "hetretrieval.cli.evaluate", "-m", *launcher, *TINY,
                           f"paths.cache_dir={cache}", f"hydra.sweep.dir={sweep}"],
                          cwd=PROJECT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return sweep


def wandb_records(run_dir: Path) -> tuple[object, dict]:
    """The run record and the final summary values of the one offline W&B run under `run_dir`, read from its
    `.wandb` file (a LevelDB-style log of protobuf records: 32 KiB blocks, 7-byte chunk headers)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/*.wandb")
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    run, summary, chunk, position = None, {}, b"", 7
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            break
        chunk += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "run":
                run = record.run
            elif record.WhichOneof("record_type") == "summary":
                summary.update({item.key: json.loads(item.value_json) for item in record.summary.update if item.key})
    return run, summary


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> tuple[Path, Path]:
    """The basic (in-process, sequential) launcher's sweep, and the cache of generated benchmark images."""
    root = tmp_path_factory.mktemp("launchers")
    return _multirun(root / "basic", root / "cache"), root / "cache"


def _check_sweep(sweep: Path, reference: Path | None = None) -> None:
    assert sorted(p.name for p in sweep.iterdir() if (p / "summary.json").is_file()) == RUNS
    groups = set()
    for name in RUNS:
        summary = json.loads((sweep / name / "summary.json").read_text())
        run, values = wandb_records(sweep / name)
        assert run.display_name == name.split("_", 1)[1] and list(run.tags) == ["from-env"]
        groups.add(run.run_group)
        assert values["dim"] == summary["dim"] == 1280
        assert {k: values[f"timings/{k}"] for k in summary["timings"]} == summary["timings"]
        assert {k: values[f"counts/{k}"] for k in summary["counts"]} == summary["counts"]
        if reference is not None:
            expected = json.loads((reference / name / "summary.json").read_text())
            for key in ("descriptor", "dataset", "counts", "mAP", "class_mAP", "mP@1", "mP@5"):
                assert summary[key] == expected[key], key
            assert (sweep / name / "per_class_map.csv").read_text() == (reference / name / "per_class_map.csv").read_text()
            np.testing.assert_allclose(np.load(sweep / name / "descriptors.npy"),
                                       np.load(reference / name / "descriptors.npy"), atol=1e-6, rtol=0)
            np.testing.assert_array_equal(np.load(sweep / name / "neighbours.npy"),
                                          np.load(reference / name / "neighbours.npy"))
    assert groups == {f"eval-{sweep.name}"}  # one W&B group per multirun


def test_plain_multirun_names_folders_and_wandb_runs_after_the_swept_override(plain):
    _check_sweep(plain[0])


@pytest.mark.parametrize("launcher", sorted(PLUGINS))
def test_launcher_writes_the_plain_launchers_results(plain, launcher, tmp_path):
    pytest.importorskip(PLUGINS[launcher], reason=f"hydra/launcher={launcher} needs pip install -e '.[cluster]'")
    reference, cache = plain
    sweep = _multirun(tmp_path / launcher, cache, f"hydra/launcher={launcher}")
    _check_sweep(sweep, reference)


def test_slurm_gpu_preset_sets_the_cluster_options():
    pytest.importorskip(PLUGINS["submitit_local"], reason="hydra/launcher=slurm_gpu needs pip install -e '.[cluster]'")
    from hydra import compose, initialize_config_dir

    from hetretrieval.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=["hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu",
                                         "hydra.launcher.timeout_min=30"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 1, 30)
