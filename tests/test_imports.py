"""Imports run one way, down the pipeline, and optional heavy libraries stay out of the lower packages' import.

`cli` -> `training`/`evaluation` -> `analysis` -> `metrics`/`index`/`extraction` -> `models` -> `data` ->
`config`/`errors`/`files`/`loggers`/`seeding`/`allocator`: a package never imports one of a higher rank (and `metrics` never imports `data`).
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "hetretrieval"
RANK = {"errors": 0, "config": 0, "loggers": 0, "seeding": 0, "files": 0, "allocator": 0, "data": 1, "models": 2, "index": 3, "metrics": 3, "extraction": 3,
        "analysis": 4, "training": 5, "evaluation": 5, "cli": 6}
HEAVY = ("faiss", "matplotlib", "wandb")
LOWER = ("data", "models", "index", "metrics", "extraction")


def _imports(path: Path, top_level_only: bool = False) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module or "")
    return names


def _package(path: Path) -> str:
    return path.relative_to(SOURCE).parts[0].removesuffix(".py")


def _violations() -> list[str]:
    bad = []
    for path in SOURCE.rglob("*.py"):
        here = _package(path)
        if here not in RANK:
            continue
        for module in _imports(path):
            parts = module.split(".")
            if parts[0] != "hetretrieval" or len(parts) < 2 or parts[1] not in RANK:
                continue
            if RANK[parts[1]] > RANK[here] or (here == "metrics" and parts[1] == "data"):
                bad.append(f"{path.relative_to(SOURCE)} imports {module}")
    return bad


def test_every_package_is_ranked():
    packages = {_package(p) for p in SOURCE.iterdir() if p.name != "__init__.py" and not p.name.startswith("_")
                and (p.is_dir() and (p / "__init__.py").exists() or p.suffix == ".py")}
    assert packages <= set(RANK), f"unranked packages: {sorted(packages - set(RANK))}"


def test_no_import_climbs_back_up_the_pipeline():
    assert _violations() == []


def test_the_check_catches_a_climbing_import(tmp_path, monkeypatch):
    """The check itself can fail: a models file importing training, and metrics importing data, are caught."""
    fake = tmp_path / "hetretrieval"
    for package, module in [("models", "from hetretrieval.training.module import FineTuningModule"),
                            ("metrics", "import hetretrieval.data.datasets")]:
        (fake / package).mkdir(parents=True)
        (fake / package / "bad.py").write_text(module + "\n")
    monkeypatch.setattr(sys.modules[__name__], "SOURCE", fake)
    assert sorted(_violations()) == ["metrics/bad.py imports hetretrieval.data.datasets",
                                     "models/bad.py imports hetretrieval.training.module"]


@pytest.mark.parametrize("package", LOWER)
def test_lower_packages_import_no_heavy_library_at_module_level(package):
    found = [f"{path.relative_to(SOURCE)}: {module}" for path in (SOURCE / package).rglob("*.py")
             for module in _imports(path, top_level_only=True) if module.split(".")[0] in HEAVY]
    assert found == []


def test_importing_the_engine_and_the_models_loads_neither_faiss_nor_matplotlib():
    """(Lightning itself loads matplotlib, and timm loads wandb: the lower packages import neither of those.)"""
    code = ("import sys; import hetretrieval.extraction.engine, hetretrieval.extraction.store, "
            "hetretrieval.models.network, hetretrieval.models.checkpoints, hetretrieval.metrics.retrieval, "
            "hetretrieval.index.local; "
            "print(','.join(m for m in ('faiss', 'matplotlib', 'pytorch_lightning', 'hetretrieval.analysis',"
            " 'hetretrieval.evaluation')"
            " if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == ""


CLI = sorted(p.stem for p in (SOURCE / "cli").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("module", CLI)
def test_entry_points_import_and_answer_help_without_torch(module):
    """`--help` (and so the module import) loads neither torch nor Lightning nor timm: it answers in about a
    second, not the 6-12 s those cost (benchmarks/startup.py)."""
    code = ("import atexit, sys; atexit.register(lambda: print('loaded:' + ','.join(m for m in "
            "('torch', 'pytorch_lightning', 'timm', 'scipy.stats') if m in sys.modules))); "
            f"sys.argv = ['{module}', '--help']; from hetretrieval.cli.{module} import main; main()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "== Config groups" in done.stdout and done.stdout.splitlines()[-1] == "loaded:"


def test_a_one_process_evaluation_runs_without_lightning(tmp_path, cache_dir):
    """The default trainer (one process, one device) runs the engine's own loop: no Lightning import before
    the results (none at all without a logger), and `summary.json` names the device as Lightning did."""
    from conftest import TINY_BUILTIN

    overrides = [*TINY_BUILTIN, "~logger", "cache=false", "evaluation.report=false",
                 f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={cache_dir}"]
    code = ("import sys; from hetretrieval import evaluate; "
            f"summary = evaluate({overrides!r}); "
            "print(summary['device'], summary['counts']['described'], 'pytorch_lightning' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    import torch

    device = "cuda:0" if torch.cuda.is_available() else "cpu"  # Lightning's names (CUDA before MPS: no Mac here)
    assert done.stdout.split()[-3:] == [device, "12", "False"]
