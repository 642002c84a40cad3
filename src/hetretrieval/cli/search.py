"""`hetretrieval-search`: query an index built by `hetretrieval-index` (Hydra entry point).

`hetretrieval-search index=<dir> query=<image or folder> top_k=20 [rerank=delf|orb]` prints the ranked
neighbours with their scores and writes `results.csv`, `contact_sheet.png` and `results.html` to the run folder.
Queries are described with the index's own `config.yaml`.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from hetretrieval.allocator import keep_freed_memory
from hetretrieval.config import CONFIG_DIR
from hetretrieval.errors import HetRetrievalError

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="search")
def main(cfg: DictConfig) -> None:
    keep_freed_memory()
    from hetretrieval.evaluation.collection import search_collection

    try:
        results = search_collection(cfg, cfg.output_dir)
    except HetRetrievalError as error:
        log.error("%s", error)
        raise SystemExit(f"hetretrieval: {error}") from None
    for query, found in results.items():
        print(f"\n{query}")
        for n in found:
            inliers = f"  {n.inliers:4d} inliers" if n.inliers is not None else ""
            print(f"{n.rank:4d}  {n.similarity:.4f}{inliers}  {n.path}")
    print(f"\nresults written to {cfg.output_dir} (results.csv, contact_sheet.png, results.html)")


if __name__ == "__main__":
    main()
