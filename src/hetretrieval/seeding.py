"""The one way to derive a seed from several integers (run seed, epoch, batch, image index...), and to seed a run."""

from __future__ import annotations

import os

_PRIME = 1_000_003
_MODULUS = 2**63  # torch.Generator.manual_seed takes a 64-bit seed


def mix_seed(*parts: int) -> int:
    """A seed determined by `parts`, in order: `((p0 * P + p1) * P + p2) ...` modulo 2^63, `P = 1_000_003`.

    Two parts give `p0 * 1_000_003 + p1`, so distinct (run seed, draw) pairs below a million never collide.
    """
    value = 0
    for part in parts:
        value = (value * _PRIME + int(part)) % _MODULUS
    return value


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch as `pytorch_lightning.seed_everything(seed, workers=True)` does, its
    environment variables included (spawned DDP ranks and data-loader workers read them), without importing
    Lightning (which costs a run seconds of start-up)."""
    import random

    import numpy as np
    import torch

    os.environ["PL_GLOBAL_SEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (the legacy global state is what Lightning seeds)
    torch.manual_seed(seed)
    os.environ["PL_SEED_WORKERS"] = "1"
