"""`keep_freed_memory`: repeated forward passes stop page-faulting their activations back in (glibc only)."""

import json
import os
import platform
import subprocess
import sys

import pytest

from hetretrieval.allocator import keep_freed_memory, user_chose_allocator

# minor page faults per forward pass of a small conv net at 224 px in a worker thread (its own glibc arena, as
# extraction streams have), after 3 warm-up passes; with `tune` the process first calls keep_freed_memory (the
# main thread is not measured: by default its arena's thresholds adapt, some runs faulting, some not)
FAULTS = """
import json, resource, sys, threading, torch
from hetretrieval.allocator import keep_freed_memory
set_ = keep_freed_memory() if sys.argv[1] == "tune" else None
torch.set_num_threads(1)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                          torch.nn.Conv2d(32, 64, 3, stride=2, padding=1)).eval()
def passes():
    with torch.inference_mode():
        for _ in range(3):
            net(torch.rand(1, 3, 224, 224))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            net(torch.rand(1, 3, 224, 224))
        print(json.dumps({"set": set_, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10}))
worker = threading.Thread(target=passes)
worker.start()
worker.join()
"""

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="glibc's mallopt only")


def _faults(mode: str, env: dict | None = None) -> dict:
    done = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout)


@glibc
def test_forward_passes_page_fault_only_with_the_default_thresholds():
    default, tuned = _faults("default"), _faults("tune")
    assert tuned["set"] is True
    # each pass maps its ~8 MiB of activations afresh by default (~2,000 pages); none once freed memory is kept
    assert default["faults"] > 1000, default
    assert tuned["faults"] < 50, tuned


@glibc
def test_an_allocator_set_by_the_environment_is_left_alone(monkeypatch):
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.check=0"}
    assert _faults("tune", env)["set"] is False
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert keep_freed_memory() is False


def test_which_environments_choose_the_allocator():
    assert not user_chose_allocator({"PATH": "/bin", "LD_LIBRARY_PATH": "/x", "MALLOC": "1", "MALLOC_X_": "1"})
    assert user_chose_allocator({"MALLOC_MMAP_THRESHOLD_": "65536"})
    assert user_chose_allocator({"MALLOC_ARENA_MAX": "2"})
    assert user_chose_allocator({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"})
    assert not user_chose_allocator({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX"})
