"""The extraction engine under a Lightning `Trainer`: accelerators, precision and DDP come from `trainer=...`.

Each rank describes its share of the size-bucketed batches; at the end of prediction every rank's batches are
gathered (`Collector.finish`) and global rank 0 hands the `Extraction` to `on_extracted` (the evaluation), which
therefore also runs inside a spawned rank-0 process under `ddp_spawn`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytorch_lightning as pl

from hetretrieval.data.datasets import ImageRecord
from hetretrieval.extraction.batching import ImagePlan
from hetretrieval.extraction.engine import Collector, Extraction, ExtractionEngine


class ExtractionModule(pl.LightningModule):
    """`trainer.predict(ExtractionModule(engine, records, plan, on_extracted))` describes every record."""

    def __init__(self, engine: ExtractionEngine, records: Sequence[ImageRecord], plan: ImagePlan,
                 on_extracted: Callable[[Extraction], None] | None = None) -> None:
        super().__init__()
        self.engine = engine
        self.records, self.plan, self.on_extracted = list(records), plan, on_extracted
        self.extraction: Extraction | None = None
        self._collector: Collector | None = None

    def predict_dataloader(self):
        return self.engine.loader(self.records, self.plan, rank=self.trainer.global_rank,
                                  world_size=self.trainer.world_size)

    def on_predict_epoch_start(self) -> None:
        self._collector = self.engine.collector(len(self.records), self.plan)

    def predict_step(self, batch: dict, batch_idx: int) -> None:
        self._collector.add(self.engine.describe_batch(batch))

    def on_predict_epoch_end(self) -> None:
        self.extraction = self._collector.finish()
        if self.trainer.is_global_zero and self.on_extracted is not None:
            self.on_extracted(self.extraction)
