"""notebooks/analysis.ipynb on a fresh clone: its code cells, run in order, make the small runs they read and
draw every figure; run again, they find the runs. Jupyter is not needed: `IPython.display` is a stand-in that
records what the notebook shows."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

import hetretrieval

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "analysis.ipynb"


def _run_cells(cells: list[str], monkeypatch) -> list[tuple[str, object]]:
    shown: list[tuple[str, object]] = []
    display = types.ModuleType("IPython.display")
    display.Image, display.Markdown = (lambda path: ("image", Path(path))), (lambda text: ("markdown", text))
    display.display = shown.append
    ipython = types.ModuleType("IPython")
    ipython.version_info, ipython.display = (9, 0, 0), display  # matplotlib reads the version
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    namespace: dict = {"__name__": "__main__"}
    for index, source in enumerate(cells):
        exec(compile(source, f"{NOTEBOOK.name} code cell {index}", "exec"), namespace)
    return shown


@pytest.mark.slow  # makes three small runs: a few minutes on two cores
def test_the_notebook_makes_the_runs_it_reads_then_finds_them(tmp_path, monkeypatch):
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert all(not cell["outputs"] and cell["execution_count"] is None for cell in code)  # committed cleared
    cells = ["".join(cell["source"]) for cell in code]
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")  # a fresh clone: nothing under logs/ yet

    shown = _run_cells(cells, monkeypatch)
    images = [value for kind, value in shown if kind == "image"]
    figures = tmp_path / "notebooks" / "logs" / "notebook" / "figures"
    assert {path.relative_to(figures).as_posix() for path in images} == {
        "comparison/per_class_map.png", "comparison/correlation_heatmap.png", "table1.png", "variations.png",
        "figure4/figure4_best.png", "figure4/figure4_worst.png", "study.png"}
    assert all(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in images)
    (table,) = [value for kind, value in shown if kind == "markdown"]
    assert "| pooling=gem |" in table and "| pooling=mac |" in table

    def no_new_run(overrides=()):
        raise AssertionError(f"the notebook made a run it should have found: {overrides}")

    monkeypatch.setattr(hetretrieval, "evaluate", no_new_run)
    assert len(_run_cells(cells, monkeypatch)) == len(shown)
