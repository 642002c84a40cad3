"""What `hetretrieval-eval` shows in a terminal: our lines and one progress bar, none of the libraries' noise."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from conftest import SHARED_DATA


def run_in_terminal(args: list[str], cwd: Path, timeout: float = 300) -> tuple[int, str]:
    """Run `args` with a 120-column pseudo-terminal as stdin, stdout and stderr (so progress bars draw);
    returns the exit status and everything written, carriage returns included."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(args, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1.0)[0]:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        return process.wait(timeout=max(1.0, deadline - time.monotonic())), b"".join(chunks).decode(errors="replace")
    finally:
        process.kill()
        os.close(master)


def test_the_class_table_says_how_many_classes_it_hides_and_the_rate_has_one_decimal(tmp_path, capsys):
    from hetretrieval.evaluation.publish import print_run

    rows = [{"class": f"c{i:02d}", "n_queries": 3, "mAP": i / 20} for i in range(13)]
    summary = {"descriptor": "gem", "dataset": "toy", "backbone": "net", "mAP": 0.5, "class_mAP": 0.25,
               "counts": {"evaluated_queries": 39, "database": 39, "skipped": 0}, "timings": {"images_per_s": 12.345}}
    print_run(summary, rows, [1], tmp_path, show_classes=4)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[4:8]] == ["c12", "c11", "c01", "c00"]  # best two, worst two
    assert lines[8] == f"… 9 more classes (all in {tmp_path / 'per_class_map.csv'})"
    assert lines[9] == "mAP 0.5000   class mAP 0.2500   mP@1 n/a   (12.3 images/s)"
    print_run(summary, rows[:4], [1], tmp_path, show_classes=4)
    assert "more classes" not in capsys.readouterr().out


@pytest.mark.slow  # about a minute each on two cores
@pytest.mark.parametrize("loop", [
    ["evaluation.search=hnsw"],  # the engine's own loop; faiss imported
    ["+trainer.limit_predict_batches=1.0"],  # a trainer option only Lightning knows: Lightning's predict loop
], ids=["engine", "lightning"])
def test_a_terminal_run_shows_our_lines_and_one_progress_bar(tmp_path, loop):
    command = Path(sys.executable).parent / "hetretrieval-eval"
    status, shown = run_in_terminal([
        str(command), "dataset=builtin", "dataset.variants_per_class=1",  # 12 classes of 2 images
        "dataset.image_size=64", "extraction.max_size=64", f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.data_dir={SHARED_DATA}", "evaluation.report=false", *loop], cwd=tmp_path)
    assert status == 0, shown[-3000:]
    assert "generating the built-in benchmark (24 images, once) into " in shown  # the first-time generation
    for noise in ("faiss.loader", "Loading faiss", "Tip:", "litlogger", "LeafSpec", "GPU available",
                  "LOCAL_RANK", "Predicting"):
        assert noise not in shown
    assert shown.count("describing:   0%") == 1 and "24/24" in shown, shown[-3000:]  # our bar, once, to the end
    assert re.search(r"\n… 2 more classes \(all in \S+per_class_map\.csv\)\r?\n", shown)
    assert re.search(r"\nmAP \d\.\d{4}   class mAP .*   \(\d+\.\d images/s\)\r?\n", shown)
