"""The process's heap set for tensor work: glibc keeps the memory it frees instead of handing it back each time.

By default glibc returns large freed blocks to the kernel: blocks above its mmap threshold are unmapped, and
free memory at the top of a heap beyond its trim threshold is released. A CPU forward pass frees its
activations as it goes, so the next pass page-faults them back in: a small conv net at 224 px took ~4,700 minor
page faults per pass in a thread (none with the thresholds raised; tests/unit/test_allocator.py), and a CPU
extraction of 224 pacs-dev images in 2 streams spent 0.28-1.14 s in the kernel, 0.12-0.14 s with them raised,
running 1.05x / 1.22x faster (mins / medians; in batches of 1: 1.27-1.90 s, 1.17x / 1.31x;
`benchmarks/allocator.py`).
Raising them is what preloading jemalloc or tcmalloc does for PyTorch on the CPU, without the preload. The
cost: up to `TRIM_THRESHOLD` of freed memory per heap stays with the process instead of going back to the
system.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc's malloc.h)
MMAP_THRESHOLD = 32 << 20  # the most glibc accepts on 64-bit: blocks up to 32 MiB come from the heap
TRIM_THRESHOLD = 256 << 20  # free memory a heap keeps at its top
# the environment variables by which glibc's malloc is set (`man 3 mallopt`), besides GLIBC_TUNABLES' glibc.malloc.*
GLIBC_MALLOC_VARIABLES = ("MALLOC_ARENA_MAX", "MALLOC_ARENA_TEST", "MALLOC_CHECK_", "MALLOC_MMAP_MAX_",
                          "MALLOC_MMAP_THRESHOLD_", "MALLOC_PERTURB_", "MALLOC_TOP_PAD_", "MALLOC_TRIM_THRESHOLD_")


def user_chose_allocator(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment already sets glibc's malloc (`GLIBC_MALLOC_VARIABLES`, `glibc.malloc.*` tunables;
    `GLIBC_TUNABLES=glibc.malloc.check=0`, a no-op, keeps glibc's own thresholds)."""
    return (any(name in environ for name in GLIBC_MALLOC_VARIABLES)
            or "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""))


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (the CLI does at the start of a run); True if
    set. Left alone where the environment already sets glibc's malloc; False outside glibc, where `mallopt` is
    missing (macOS, Windows) or does nothing (musl)."""
    if user_chose_allocator():
        log.debug("glibc malloc set by the environment: thresholds left as they are")
        return False
    try:  # the symbols already loaded into the process, the C library's among them (no ldconfig look-up)
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
