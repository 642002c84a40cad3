"""The built-in benchmark's one-time generation: announced, and safe when several jobs share a fresh cache."""

from __future__ import annotations

import csv
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import hetretrieval.data.builtin as builtin
from hetretrieval.data.builtin import builtin_benchmark
from hetretrieval.errors import DataError

TINY = dict(photos=["camera", "coins"], variations=["grayscale", "blur"], variants_per_class=2, image_size=32)


def _folder(cache: Path) -> Path:
    (folder,) = cache.glob("builtin-*")
    return folder


def _read(cache: Path) -> tuple[list[dict], dict[str, np.ndarray]]:
    folder = _folder(cache)
    with (folder / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return rows, {row["filename"]: np.asarray(Image.open(folder / row["filename"])) for row in rows}


def test_first_generation_is_announced_and_complete(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="hetretrieval.data.builtin"):
        dataset = builtin_benchmark(tmp_path, **TINY)
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0] == f"generating the built-in benchmark (6 images, once) into {_folder(tmp_path)}"
    assert messages[1].startswith("generated the built-in benchmark in ") and messages[1].endswith(" s")
    rows, images = _read(tmp_path)
    assert [row["filename"] for row in rows] == [f"{p}_{i:02d}.png" for p in ("camera", "coins") for i in range(3)]
    assert [row["variations"] for row in rows[:3]] == ["original", "grayscale", "blur"]
    assert list(rows[0]) == ["filename", "label", "variations", "grayscale", "blur"]
    assert len(dataset) == 6 and all(max(image.shape[:2]) == 32 for image in images.values())
    assert sorted(path.name for path in tmp_path.iterdir()) == [_folder(tmp_path).name]  # no temporary left
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hetretrieval.data.builtin"):
        assert len(builtin_benchmark(tmp_path, **TINY)) == 6
    assert not caplog.records  # generated once, then read


def test_a_loser_of_the_generation_race_uses_the_winners_folder(tmp_path, monkeypatch):
    """Another job renames its complete folder into place while this one generates: this one's is dropped."""
    real_generate = builtin.generate_benchmark

    def generate_while_another_job_finishes(output_dir, **options):
        real_generate(output_dir, **options)
        winner = output_dir.with_name(output_dir.name.split(".")[1])
        real_generate(winner, **options)
        (winner / "winner").touch()

    monkeypatch.setattr(builtin, "generate_benchmark", generate_while_another_job_finishes)
    assert len(builtin_benchmark(tmp_path, **TINY)) == 6
    assert (_folder(tmp_path) / "winner").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == [_folder(tmp_path).name]


def test_a_partial_folder_of_an_interrupted_generation_is_replaced(tmp_path):
    builtin_benchmark(tmp_path / "reference", **TINY)
    reference = _read(tmp_path / "reference")
    partial = tmp_path / "cache" / _folder(tmp_path / "reference").name
    partial.mkdir(parents=True)
    (partial / "camera_00.png").write_bytes(b"half an image")  # an old in-place generation, killed
    assert len(builtin_benchmark(tmp_path / "cache", **TINY)) == 6
    rows, images = _read(tmp_path / "cache")
    assert rows == reference[0] and images.keys() == reference[1].keys()
    assert all(np.array_equal(images[name], reference[1][name]) for name in images)
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == [partial.name]


def test_parallel_jobs_on_a_fresh_cache_share_one_benchmark(tmp_path):
    builtin_benchmark(tmp_path / "reference", **TINY)
    reference = _read(tmp_path / "reference")
    code = (f"from hetretrieval.data.builtin import builtin_benchmark; "
            f"print(len(builtin_benchmark({str(tmp_path / 'cache')!r}, **{TINY!r})))")
    jobs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    assert [job.communicate(timeout=300)[0] for job in jobs] == ["6\n", "6\n"]
    rows, images = _read(tmp_path / "cache")
    assert rows == reference[0] and all(np.array_equal(images[n], reference[1][n]) for n in images)
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == [_folder(tmp_path / "reference").name]


def test_an_unwritable_cache_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(DataError, match="cannot generate the built-in benchmark in .*file"):
        builtin_benchmark(tmp_path / "file", **TINY)
