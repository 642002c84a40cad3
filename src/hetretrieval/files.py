"""Files written whole or not at all, for every writer of the pipeline (run folders, the descriptor store, the
collection index): each write goes to a temporary name beside its target, unique to the process, and is renamed
into place, so a reader never sees half a file and two processes never share a temporary file.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from hetretrieval.errors import DataError


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(temporary path)`, then rename it to `path`; an OSError (full disk, permissions) is one line."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise DataError(f"cannot write {path} ({error.strerror or error})") from None
    return path


def write_npy(path: Path, array: np.ndarray) -> Path:
    """`array` as a `.npy` file (through a handle: `np.save` would append `.npy` to the temporary name)."""
    def write(partial: Path) -> None:
        with partial.open("wb") as handle:
            np.save(handle, array)

    return atomic_write(path, write)


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> Path:
    def write(partial: Path) -> None:
        with partial.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)

    return atomic_write(path, write)
