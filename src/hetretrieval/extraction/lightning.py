"""The extraction engine under a Lightning `Trainer`: accelerators, precision and DDP come from `trainer=...`.

Each rank describes its share of the size-bucketed batches. On one process the collector merges them
(`Collector.finish`, no file written). Under DDP with a `ShardSet` each rank writes its shard into the descriptor
store and, after a barrier, global rank 0 alone merges them (memory-mapped, in dataset order) and then removes
them; without one every rank gathers every batch. Rank 0 hands the `Extraction` to `on_extracted` (the
evaluation, which stores it), which therefore also runs inside a spawned rank-0 process under `ddp_spawn`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytorch_lightning as pl

from hetretrieval.data.datasets import ImageRecord
from hetretrieval.extraction.batching import ImagePlan
from hetretrieval.extraction.engine import Collector, Extraction, ExtractionEngine
from hetretrieval.extraction.store import ShardSet


class ExtractionModule(pl.LightningModule):
    """`trainer.predict(ExtractionModule(engine, records, plan, on_extracted, shards))` describes every record
    (`extraction`: on rank 0 only when sharded)."""

    def __init__(self, engine: ExtractionEngine, records: Sequence[ImageRecord], plan: ImagePlan,
                 on_extracted: Callable[[Extraction], None] | None = None, shards: ShardSet | None = None) -> None:
        super().__init__()
        self.engine = engine
        self.records, self.plan, self.on_extracted, self.shards = list(records), plan, on_extracted, shards
        self.extraction: Extraction | None = None
        self._collector: Collector | None = None

    def predict_dataloader(self):
        """This rank's batches, as `ExtractionEngine.extract` iterates them (`batches`: read ahead in a thread
        where that overlaps the forward)."""
        return self.engine.batches(self.records, self.plan, rank=self.trainer.global_rank,
                                   world_size=self.trainer.world_size)

    def on_predict_epoch_start(self) -> None:
        self._collector = self.engine.collector(len(self.records), self.plan)

    def predict_step(self, batch: dict, batch_idx: int) -> None:
        self._collector.add(self.engine.describe_batch(batch))

    def on_predict_epoch_end(self) -> None:
        world_size = self.trainer.world_size
        if world_size == 1 or self.shards is None:
            self.extraction = self._collector.finish()
            if self.trainer.is_global_zero and self.on_extracted is not None:
                self.on_extracted(self.extraction)
            return
        self.shards.write(self.trainer.global_rank, world_size, self._collector.part())
        self._collector = None  # this rank's share is on disk now
        self.trainer.strategy.barrier("hetretrieval-extraction-shards")
        if not self.trainer.is_global_zero:
            return
        try:
            self.extraction = self.shards.merge(world_size, self.plan, self._describe_again)
            if self.on_extracted is not None:
                self.on_extracted(self.extraction)
        finally:
            self.shards.remove()

    def _describe_again(self, rank: int) -> Extraction:
        """The images of `rank`'s batches, described here (its shard did not complete)."""
        batches = self.engine.loader(self.records, self.plan, rank=rank, world_size=self.trainer.world_size)
        ids = [i for batch in batches.batch_sampler for i in batch]
        return self.engine.extract(self.records, self.plan, ids, gather=False)  # the other ranks are done
