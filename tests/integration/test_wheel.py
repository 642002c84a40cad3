"""`pip install .` (a non-editable wheel) into a fresh venv, then `hetretrieval-eval` from another directory.

The venv reuses this interpreter's installed packages (torch, timm, ...) through a `.pth` file, so the test
installs the wheel only; the wheel itself must hold every module of src/ and every YAML of conf/.
"""

import json
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import TINY_BUILTIN

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_installed_wheel_runs_the_default_job_from_any_directory(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("hetretrieval-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"hetretrieval/{p.relative_to(ROOT / 'src' / 'hetretrieval').as_posix()}"
                for p in (ROOT / "src" / "hetretrieval").rglob("*.py")}
    expected |= {f"hetretrieval/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert expected - names == set()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (purelib,) = (venv / "lib").glob("python3*/site-packages")
    (purelib / "reuse_installed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, capture_output=True, timeout=300)

    work = tmp_path / "elsewhere"
    work.mkdir()
    command = str(venv / "bin" / "hetretrieval-eval")
    shown = subprocess.run([command, "--help"], cwd=work, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "Primary config directory not found" not in shown.stdout + shown.stderr
    assert shown.stdout.startswith("hetretrieval-eval: ") and "\n  dataset " in shown.stdout

    done = subprocess.run([command, *TINY_BUILTIN, "logger=csv", "evaluation.report=false"], cwd=work,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (summary,) = (work / "logs" / "eval" / "runs").glob("*_gem/summary.json")
    assert 0.0 < json.loads(summary.read_text())["mAP"] <= 1.0
    assert any((work / ".cache").glob("builtin-*"))  # generated under the current directory, not site-packages
    assert not (purelib / "logs").exists()
