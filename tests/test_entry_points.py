"""The Python API's composition, the presets' entry points, each entry point's `--help` and a light
`import hetretrieval`."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from hetretrieval.config import CONFIG_DIR, check_entry_point, compose_run
from hetretrieval.errors import ConfigError

PRIMARY = {"hetretrieval-eval": "eval", "hetretrieval-train": "train", "hetretrieval-analyze": "analyze"}
SCRIPTS = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
CONFIG_OF = {**PRIMARY, "hetretrieval-train-attention": "attention_train", "hetretrieval-index": "index",
             "hetretrieval-search": "search"}


def test_every_console_script_has_its_primary_config():
    assert set(SCRIPTS) == set(CONFIG_OF)
    assert all((CONFIG_DIR / f"{name}.yaml").is_file() for name in CONFIG_OF.values())


def _groups_of(config_name: str) -> dict[str, str]:
    """`group: default option` of a primary config's defaults list, as written (Hydra's own groups left out)."""
    entries = yaml.safe_load((CONFIG_DIR / f"{config_name}.yaml").read_text())["defaults"]
    return {group: "null" if option is None else option for entry in entries if isinstance(entry, dict)
            for group, option in entry.items() if group != "hydra" and not group.startswith("override ")}


def _help(script: str, *overrides: str) -> tuple[str, dict[str, str]]:
    """`<script> [overrides] --help`: its first line and the `group: chosen option` it lists (each checked to be
    one of the group's options, as listed on its line)."""
    module = SCRIPTS[script].split(":")[0]
    done = subprocess.run([sys.executable, "-m", module, *overrides, "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("== Config groups"))
    listed = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        group, chosen, *options = line.split()
        assert chosen == "null" or chosen + "," in options or chosen == options[-1], line
        listed[group] = chosen
    return lines[0], listed


@pytest.mark.parametrize("script", sorted(CONFIG_OF))
def test_help_says_in_one_line_what_the_tool_does_and_lists_the_groups_it_reads(script):
    first, listed = _help(script)
    assert first.startswith(f"{script}: ") and len(first) > len(script) + 30
    assert listed == _groups_of(CONFIG_OF[script])
    assert "loss" not in listed or script == "hetretrieval-train"  # no group of another tool


def test_help_shows_the_options_chosen_on_the_command_line():
    _, listed = _help("hetretrieval-eval", "pooling=mac", "rerank=orb")
    # rerank=orb selects the orb option of the pooling group as its `local` extractor (conf/rerank/orb.yaml)
    assert listed == {**_groups_of("eval"), "pooling": "mac", "rerank": "orb", "pooling@rerank.local": "orb"}


def test_compose_run_puts_the_run_folder_under_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_run("eval", ["pooling=mac"])
    output = Path(cfg.paths.output_dir)
    assert output.parent == tmp_path / "logs" / "eval" / "runs"
    assert output.name.endswith("_mac")
    assert "hydra" not in cfg


@pytest.mark.parametrize("script", sorted(CONFIG_OF))
def test_every_entry_point_names_its_run_folder(script, tmp_path, monkeypatch):
    """Each primary config's run folder resolves (index and search have no pooling group to name it after)."""
    monkeypatch.chdir(tmp_path)
    required = {"hetretrieval-index": ["collection=c", "index=i"], "hetretrieval-search": ["index=i", "query=q"]}
    cfg = compose_run(CONFIG_OF[script], required.get(script, []))
    assert Path(cfg.paths.output_dir).parent == tmp_path / "logs" / cfg.task_name / "runs"


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


@pytest.mark.parametrize(("overrides", "lightning"), [
    ([], False), (["trainer=cpu"], False), (["trainer.devices=1", "trainer.precision=32"], False),
    (["trainer=ddp_sim"], True), (["trainer=ddp"], True), (["debug=fast"], True),
    (["trainer.precision=bf16-mixed"], True), (["trainer.accelerator=gpu"], True), (["+trainer.num_nodes=2"], True),
])
def test_only_a_one_process_trainer_is_left_to_the_engines_own_loop(overrides, lightning):
    from hetretrieval.cli.evaluate import _needs_trainer

    assert _needs_trainer(compose_run("eval", overrides).trainer) is lightning
