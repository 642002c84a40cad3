"""`hetretrieval-index`: describe a folder of images into a persistent, searchable index (Hydra entry point).

`hetretrieval-index collection=<folder> index=<dir>` (any backbone / global pooling / extraction options;
`faiss.kind=IVF-PQ` for large collections). Re-running on a grown folder describes only the new or changed
images; vanished ones leave the index. See `hetretrieval.evaluation.collection`.
"""

from __future__ import annotations

import logging
import os

import hydra
from omegaconf import DictConfig

from hetretrieval.allocator import keep_freed_memory
from hetretrieval.config import CONFIG_DIR
from hetretrieval.errors import HetRetrievalError

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="index")
def main(cfg: DictConfig) -> None:
    keep_freed_memory()
    from hetretrieval.evaluation.collection import index_collection

    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        done = index_collection(cfg)
    except HetRetrievalError as error:
        log.error("%s", error)
        raise SystemExit(f"hetretrieval: {error}") from None
    print(f"{cfg.index}: {done['indexed']} images indexed ({done['kind']}); this run found {done['images']} "
          f"files: {done['new']} new, {done['changed']} changed, {done['removed']} removed; described "
          f"{done['described']}, skipped {done['skipped']} (reasons in images.csv)")


if __name__ == "__main__":
    main()
