"""hetretrieval: content-based image retrieval on heterogeneous iconographic collections.

`import hetretrieval` stays light: `evaluate` and the low-level pieces (`Backbone`, the pooling heads,
`load_image`) import torch and friends only when first used.
"""

from __future__ import annotations

from collections.abc import Sequence

__version__ = "0.1.0"

_LAZY = {"Backbone": "hetretrieval.models.backbones", "load_image": "hetretrieval.data.images",
         "MAC": "hetretrieval.models.pooling.heads", "SPoC": "hetretrieval.models.pooling.heads",
         "GeM": "hetretrieval.models.pooling.heads", "RMAC": "hetretrieval.models.pooling.heads",
         "RetrievalNetwork": "hetretrieval.models.network"}


def evaluate(overrides: Sequence[str] = ()) -> dict | None:
    """`hetretrieval-eval <overrides>` from Python (notebooks): the same config, run folder and heap
    (`allocator`), without `hydra.main`; returns the run's summary (`{head: summary}` with several heads)."""
    from hetretrieval.allocator import keep_freed_memory
    from hetretrieval.cli.evaluate import evaluate as run
    from hetretrieval.config import check_entry_point, compose_run

    keep_freed_memory()
    cfg = compose_run("eval", overrides)
    check_entry_point(cfg, "hetretrieval-eval")
    return run(cfg)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'hetretrieval' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
