"""The Python API's composition, the presets' entry points and a light `import hetretrieval`."""

import subprocess
import sys
from pathlib import Path

import pytest

from hetretrieval.config import CONFIG_DIR, check_entry_point, compose_run
from hetretrieval.errors import ConfigError

PRIMARY = {"hetretrieval-eval": "eval", "hetretrieval-train": "train", "hetretrieval-analyze": "analyze"}


def test_compose_run_puts_the_run_folder_under_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_run("eval", ["pooling=mac"])
    output = Path(cfg.paths.output_dir)
    assert output.parent == tmp_path / "logs" / "eval" / "runs"
    assert output.name.endswith("_mac")
    assert "hydra" not in cfg


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")
                                          if p.stem != "finetune_pacs_base"))
def test_each_preset_runs_under_its_own_entry_point_only(preset):
    meant = {"paper": "hetretrieval-eval", "pacs": "hetretrieval-analyze", "finetune": "hetretrieval-train"}[
        preset.split("_")[0]]
    check_entry_point(compose_run(PRIMARY[meant], [f"experiment={preset}"]), meant)
    for other in (command for command in PRIMARY if command != meant):
        # a training preset overrides groups (loss, augmentation) the others lack: Hydra refuses it while composing
        with pytest.raises(ConfigError, match=f"this experiment preset is for {meant}, not {other}"
                           "|Could not override '(loss|augmentation)'"):
            check_entry_point(compose_run(PRIMARY[other], [f"experiment={preset}"]), other)


def test_importing_the_package_imports_no_torch():
    code = ("import sys, hetretrieval; assert callable(hetretrieval.evaluate); "
            "print(','.join(m for m in ('torch', 'pytorch_lightning', 'hydra') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == ""
