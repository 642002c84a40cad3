"""The extraction engine: the one loop that turns a dataset's images into descriptors.

Evaluation, training validation and mining, whitening fits, NetVLAD's initialisation, the local pipeline and
the controlled-variation study all describe images through `ExtractionEngine`. It owns the size-bucketed
loader (`batching`), device placement, multi-scale (through `RetrievalNetwork`), many heads per backbone pass,
local extractors, skip-and-report of unreadable images, DDP sharding and the de-duplicating gather, and the
progress bar. Lightning may drive the loop (`ExtractionModule`, for accelerators and DDP); otherwise
`ExtractionEngine.extract` iterates itself: both run the same per-batch code and the same collector.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from hetretrieval.data.datasets import ImageRecord, RetrievalDataset
from hetretrieval.errors import ConfigError
from hetretrieval.extraction.batching import (
    ImageFileDataset,
    ImagePlan,
    ImageSource,
    SizeBucketBatchSampler,
    collate_same_size,
    keep_first,
    merge_gathered,
)
from hetretrieval.models.local.features import LocalFeatures
from hetretrieval.models.network import RetrievalNetwork

if TYPE_CHECKING:
    from hetretrieval.config import ExtractionOptions

log = logging.getLogger(__name__)

NOT_EXTRACTED = "not extracted (prediction stopped early: fast_dev_run or a batch limit)"
LocalExtractor = Callable[[torch.Tensor], LocalFeatures]  # (3, H, W) in [0, 1] -> features (DELF, ORB)
PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}  # extraction.precision -> autocast dtype
# more Python threads dispatching a network's small ops would mostly wait for the GIL
MAX_AUTO_STREAMS = 4


@dataclass(frozen=True)
class View:
    """A transformed copy of some images, described beside the clean ones (the controlled study).

    `transform(images (b, 3, H, W), index (b,))` returns the varied images; `applies_to (N,)` marks the records
    it varies: the others keep their clean descriptors. A view's descriptors are the heads `<view>/<head>`.
    """

    transform: Callable[[torch.Tensor, np.ndarray], torch.Tensor]
    applies_to: np.ndarray


@dataclass
class Extraction:
    """Descriptors of a dataset in record order (zero rows / None where not described).

    `descriptors[head]` is `(N, D)` float32, `local_features[head]` a list of N `LocalFeatures` or None (a
    `View`'s heads are `<view>/<head>`). `skipped` maps record index -> reason;
    `complete` is False when extraction stopped early (fast_dev_run), which is never cached.
    """

    valid: np.ndarray
    skipped: dict[int, str]
    descriptors: dict[str, np.ndarray] = field(default_factory=dict)
    local_features: dict[str, list[LocalFeatures | None]] = field(default_factory=dict)
    seconds: float = 0.0
    complete: bool = True

    @property
    def images_per_second(self) -> float:
        return float(self.valid.sum()) / max(self.seconds, 1e-9)


def default_device() -> torch.device:
    """The accelerator when present (CUDA, then Apple MPS), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class ExtractionEngine(nn.Module):
    """`network` (backbone + global heads, may be None) and `local` extractors over batches of images.

    `batch_size` images of one size per batch, at most `batch_pixels` pixels (`SizeBucketBatchSampler`);
    `num_workers` decoding processes; with none, the next batches are decoded in a background thread (PIL
    releases the GIL) where that overlaps the forward pass (`batches`). On the CPU, `extract` runs `streams` forward passes at once, torch's threads
    shared out among them (`stream_threads`): each stream decodes its own batches, so one decodes while the
    others compute, and small per-thread passes use cores better than one pass parallelised across them (PIL
    and torch's kernels release the GIL). `precision` "bf16" / "16" runs the network under autocast (on the CPU,
    "16" falls back to bf16, said once in the log); `channels_last` lays the network and batches out NHWC;
    `pin_memory` pins host batches when a CUDA device is present. At "32" without channels_last, descriptors
    are those of the plain forward at the stream's torch thread count, bit for bit (other thread counts sum
    in another order: within 1e-6).
    """

    def __init__(self, network: RetrievalNetwork | None, local: Mapping[str, LocalExtractor] | None = None,
                 batch_size: int = 1, num_workers: int = 0, progress: bool = True, precision: str = "32",
                 channels_last: bool = False, pin_memory: bool = True, streams: int | None = None,
                 batch_pixels: int | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"extraction batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ConfigError(f"extraction num_workers must be >= 0, got {num_workers}")
        if streams is not None and streams < 1:
            raise ConfigError(f"extraction streams must be >= 1 or None, got {streams}")
        if str(precision) not in PRECISIONS:
            raise ConfigError(f"extraction precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if network is None and not local:
            raise ConfigError("nothing to extract: no global head and no local extractor")
        self.network = network
        self.local = dict(local or {})
        # extractors that are modules (DELF) move with the engine; ORB runs on the CPU
        self.local_modules = nn.ModuleDict({k: v for k, v in self.local.items() if isinstance(v, nn.Module)})
        self.batch_size, self.batch_pixels, self.num_workers = batch_size, batch_pixels, num_workers
        self.progress = progress
        self.precision, self.channels_last, self.pin_memory = str(precision), channels_last, pin_memory
        self.streams = streams
        if channels_last and network is not None:
            network.to(memory_format=torch.channels_last)
        self._warned_fp16_on_cpu = False

    @classmethod
    def from_options(cls, network: RetrievalNetwork | None, local: Mapping[str, LocalExtractor] | None,
                     options: ExtractionOptions, progress: bool = True) -> ExtractionEngine:
        """The engine that `extraction.*` (`options`) configures."""
        return cls(network, local, batch_size=options.batch_size, batch_pixels=options.batch_pixels,
                   num_workers=options.num_workers, progress=progress,
                   precision=options.precision, channels_last=options.channels_last, pin_memory=options.pin_memory,
                   streams=options.streams)

    @property
    def head_names(self) -> list[str]:
        return [*(self.network.heads if self.network is not None else ()), *self.local]

    @property
    def device(self) -> torch.device:
        parameter = next(self.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    def loader(self, records: Sequence[ImageRecord], plan: ImagePlan, ids: Sequence[int] | None = None,
               rank: int = 0, world_size: int = 1) -> DataLoader:
        """Size-exact batches `{"index", "images", "failed"}` of `records` (or of `ids`), this rank's share."""
        sampler = SizeBucketBatchSampler(plan.shapes, self.batch_size, world_size, rank, ids, self.batch_pixels)
        return DataLoader(ImageFileDataset(records, plan), batch_sampler=sampler, collate_fn=collate_same_size,
                          num_workers=self.num_workers, persistent_workers=False,
                          pin_memory=self.pin_memory and torch.cuda.is_available())

    def batches(self, records: Sequence[ImageRecord], plan: ImagePlan, ids: Sequence[int] | None = None,
                rank: int = 0, world_size: int = 1) -> DataLoader | ReadAhead:
        """`loader`'s batches, sized; without worker processes, decoded up to two batches ahead in a thread
        when that overlaps the forward: on an accelerator, or on the CPU when torch leaves a core free (with
        every core in torch's threads the decoding thread stalls them: 2 threads on 2 cores, pacs-dev batch 1,
        2.0x slower, benchmarks/extraction_throughput.py). `extract` and `ExtractionModule` iterate these."""
        loader = self.loader(records, plan, ids, rank, world_size)
        overlaps = self.device.type != "cpu" or torch.get_num_threads() < _cpu_cores()
        return ReadAhead(loader, depth=2) if overlaps and not self.num_workers else loader

    def stream_threads(self) -> list[int]:
        """The torch threads of each of the forward passes `extract` runs at once: on the CPU, torch's threads
        shared out among `streams` (None: one stream per thread, at most `MAX_AUTO_STREAMS`), each at least 1;
        a single stream with all of them on an accelerator."""
        threads = torch.get_num_threads()
        count = 1 if self.device.type != "cpu" else self.streams or min(threads, MAX_AUTO_STREAMS)
        return [max(1, threads // count + (i < threads % count)) for i in range(count)]

    @torch.inference_mode()
    def describe_batch(self, batch: dict, views: Mapping[str, View] | None = None) -> dict:
        """One batch -> `{"index" (b,), "descriptors": {head: (b, D)}, "local": {head: [features]},
        "failed": [(index, reason)]}` (on the CPU); a view's heads are named `<view>/<head>`."""
        index = batch["index"].cpu().numpy()
        images = batch["images"].to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        output = {"index": index, "descriptors": {}, "local": {}, "failed": list(batch["failed"])}
        if not index.size:
            return output
        self._describe(images, output)
        for view_name, view in (views or {}).items():
            rows = view.applies_to[index]
            varied: dict = {"descriptors": {}, "local": {}}
            if rows.any():
                selected = torch.from_numpy(rows).to(images.device)
                self._describe(view.transform(images[selected], index[rows]), varied)
            for name, clean in list(output["descriptors"].items()):
                if "/" not in name:
                    described = clean.copy()
                    if rows.any():
                        described[rows] = varied["descriptors"][name]
                    output["descriptors"][f"{view_name}/{name}"] = described
            for name, clean in list(output["local"].items()):
                if "/" not in name:
                    replaced = iter(varied["local"].get(name, []))
                    output["local"][f"{view_name}/{name}"] = [next(replaced) if r else f
                                                              for r, f in zip(rows, clean, strict=True)]
        return output

    def _describe(self, images: torch.Tensor, output: dict) -> None:
        """Every head's descriptors of `images` into `output["descriptors"]` / `output["local"]`."""
        if self.network is not None:
            dtype = self._autocast_dtype(images.device)
            with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                described = self.network(images)
            for name, d in described.items():
                output["descriptors"][name] = d.float().cpu().numpy()
        for name, extractor in self.local.items():
            output["local"][name] = [extractor(image) for image in images]

    def _autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype of `precision` on `device` (None: full precision)."""
        dtype = PRECISIONS[self.precision]
        if dtype is torch.float16 and device.type == "cpu":
            if not self._warned_fp16_on_cpu:
                log.warning("extraction.precision=16 is not supported on the CPU: using bf16 autocast instead")
                self._warned_fp16_on_cpu = True
            return torch.bfloat16
        return dtype

    def collector(self, n_images: int, plan: ImagePlan, total: int | None = None) -> Collector:
        """Accumulates this rank's batches; `finish` gathers every rank's, in dataset order."""
        return Collector(n_images, plan, total if total is not None else int(plan.readable.sum()),
                         self.progress)

    def extract(self, records: Sequence[ImageRecord], source: ImageSource | ImagePlan,
                ids: Sequence[int] | None = None, views: Mapping[str, View] | None = None,
                gather: bool = True) -> Extraction:
        """Describe `records` (or only `ids`) in this process, on the engine's device. Under DDP every rank
        describes them all and the ranks' results are gathered (rank 0's kept) unless `gather` is False: this
        process describes them alone (rank 0 redoing a failed rank's shard after the others finished)."""
        plan = source if isinstance(source, ImagePlan) else ImagePlan.scan(records, source)
        wanted = plan.readable if ids is None else np.isin(np.arange(len(records)), ids) & plan.readable
        collector = self.collector(len(records), plan, int(wanted.sum()))
        modes = {module: module.training for module in self.modules()}
        self.eval()
        describe = partial(self.describe_batch, views=views)
        threads = self.stream_threads()
        if len(threads) == 1:
            described = (describe(batch) for batch in self.batches(records, plan, ids))
        else:
            log.info("describing in %d CPU streams of %s torch thread(s)", len(threads),
                     "/".join(str(t) for t in sorted(set(threads))))
            described = in_threads(self.loader(records, plan, ids), describe, threads)
        try:
            for output in described:
                collector.add(output)
        finally:
            described.close()  # the streams stop now, even on an error
            for module, training in modes.items():  # each back to its own mode (frozen batch-norm stays frozen)
                module.training = training
        return collector.finish(ids, gather)

    def prepare(self, dataset: RetrievalDataset, plan: ImagePlan) -> None:
        """Fit the data-initialised heads (NetVLAD's k-means and whitening) on `dataset`'s images, read as
        `plan` says, before anything is described."""
        for head in (self.network.heads.values() if self.network is not None else ()):
            if hasattr(head, "prepare"):
                head.prepare(lambda ids: self.feature_maps(dataset.records, plan, ids), dataset, plan.source.max_size)

    def feature_maps(self, records: Sequence[ImageRecord], plan: ImagePlan,
                     ids: Sequence[int]) -> Iterator[torch.Tensor]:
        """The backbone's `(C, h, w)` map of each readable record of `ids` (data-initialised heads: NetVLAD)."""
        if self.network is None:
            raise ConfigError("feature maps need a backbone")
        backbone = self.network.backbone.eval()
        with torch.inference_mode():
            for batch in self.batches(records, plan, ids):
                for reason in (reason for _, reason in batch["failed"]):
                    log.warning("skipping image: %s", reason)
                if len(batch["index"]):
                    yield from backbone(batch["images"].to(self.device))


class Collector:
    """Per-rank accumulation of described batches, then the gather into an `Extraction` (rank order-free)."""

    def __init__(self, n_images: int, plan: ImagePlan, total: int, progress: bool) -> None:
        self.n_images, self.plan = n_images, plan
        self.indices: list[np.ndarray] = []
        self.descriptors: dict[str, list[np.ndarray]] = {}
        self.local: dict[str, dict[int, LocalFeatures]] = {}
        self.failed: dict[int, str] = {}
        self.started = time.perf_counter()
        self.bar = _progress_bar(total) if progress and _is_rank_zero() else None

    def add(self, output: dict) -> None:
        for index, reason in output["failed"]:
            log.warning("skipping image: %s", reason)
            self.failed[int(index)] = reason
        if self.bar is not None:
            self.bar.update(len(output["index"]) + len(output["failed"]))
        if not len(output["index"]):
            return
        self.indices.append(output["index"])
        for name, values in output["descriptors"].items():
            self.descriptors.setdefault(name, []).append(values)
        for name, features in output["local"].items():
            self.local.setdefault(name, {}).update(zip(output["index"].tolist(), features, strict=True))

    def part(self) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, dict[int, LocalFeatures]], dict[int, str],
                            float]:
        """Stop the clock and the bar: this rank's `(indices (n,), {head: (n, D)}, {head: {index: features}},
        {index: skip reason}, seconds)`."""
        seconds = time.perf_counter() - self.started
        if self.bar is not None:
            self.bar.refresh()  # the final count is drawn even when the last update fell within tqdm's interval
            self.bar.close()
        indices = np.concatenate(self.indices) if self.indices else np.zeros(0, np.int64)

        def stacked(parts: list[np.ndarray]) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)

        return indices, {k: stacked(v) for k, v in self.descriptors.items()}, self.local, self.failed, seconds

    def finish(self, ids: Sequence[int] | None = None, gather: bool = True) -> Extraction:
        """Gather every rank's batches (unless `gather` is False) and merge them in dataset order (on every
        rank)."""
        gathered = _all_gather(self.part()) if gather else [self.part()]
        valid = np.zeros(self.n_images, dtype=bool)
        extraction = Extraction(valid, dict(self.plan.unreadable), seconds=max(part[4] for part in gathered))
        heads = {name for part in gathered for name in part[1]}
        for name in sorted(heads):
            extraction.descriptors[name], valid_head = merge_gathered(
                [(part[0], part[1][name]) for part in gathered if name in part[1]], self.n_images, name)
            valid |= valid_head
        for part in gathered:
            valid[part[0]] = True
            for name, features in part[2].items():
                keep_first(extraction.local_features.setdefault(name, [None] * self.n_images), features.items())
            extraction.skipped.update(part[3])
        return finalize(extraction, self.plan, ids)


def finalize(extraction: Extraction, plan: ImagePlan, ids: Sequence[int] | None = None) -> Extraction:
    """Close a merged extraction: the wanted images (readable, among `ids`) that no rank described nor skipped
    are skipped as NOT_EXTRACTED, which makes it incomplete; skips in index order; the rate logged."""
    n_images = extraction.valid.size
    wanted = plan.readable.copy()
    if ids is not None:
        wanted &= np.isin(np.arange(n_images), ids)
    not_reached = np.flatnonzero(wanted & ~extraction.valid & ~np.isin(np.arange(n_images), list(extraction.skipped)))
    for index in not_reached:  # e.g. fast_dev_run / limit_predict_batches: say so, never hide it
        extraction.skipped[int(index)] = NOT_EXTRACTED
    extraction.complete = not_reached.size == 0
    extraction.skipped = dict(sorted(extraction.skipped.items()))
    log.info("described %d images in %.1f s (%.1f images/s)", int(extraction.valid.sum()), extraction.seconds,
             extraction.images_per_second)
    return extraction


class ReadAhead:
    """`batches` (an iterable with a length) iterated in a daemon thread, up to `depth` items ahead, so that
    decoding overlaps the consumer's forward pass (`in_threads` with one thread)."""

    def __init__(self, batches, depth: int) -> None:
        self.batches, self.depth = batches, depth

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator:
        return in_threads(self.batches, depth=self.depth, name="hetretrieval-decode")


def in_threads(items: Iterable, fn: Callable | None = None, torch_threads: Sequence[int | None] = (None,),
               depth: int = 2, name: str = "hetretrieval-extract") -> Iterator:
    """`fn(item)` for every item of `items` (the item itself if `fn` is None), computed by one daemon thread
    per entry of `torch_threads` (that thread's torch thread count; None: as it is), named `name` (`name-<i>`
    for several), which take the items in turn from the one shared iterator; yielded as they finish (in order
    with one thread), up to `depth` per thread ahead of the consumer. A thread's exception is re-raised in the
    consumer. When the consumer stops, the threads stop after their current item and torch's thread count is
    restored (it is process-wide)."""
    source, lock, stop, done = iter(items), threading.Lock(), threading.Event(), object()
    results: queue.Queue = queue.Queue(maxsize=depth * len(torch_threads))

    def put(result) -> bool:
        while not stop.is_set():
            try:
                results.put(result, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work(threads: int | None) -> None:
        try:
            if threads is not None:
                torch.set_num_threads(threads)
            while not stop.is_set():
                with lock:
                    item = next(source, done)
                if item is done or not put(item if fn is None else fn(item)):
                    break
        except BaseException as error:  # handed to the consumer, which raises it
            put(error)
            return
        put(done)

    restore = torch.get_num_threads()
    workers = [threading.Thread(target=work, args=(threads,), daemon=True,
                                name=name if len(torch_threads) == 1 else f"{name}-{i}")
               for i, threads in enumerate(torch_threads)]
    for worker in workers:
        worker.start()
    try:
        running = len(workers)
        while running:
            result = results.get()
            if result is done:
                running -= 1
            elif isinstance(result, BaseException):
                raise result
            else:
                yield result
    finally:  # the consumer stopped (done, an error, or abandoned): let the threads end
        stop.set()
        for worker in workers:
            worker.join()
        if any(threads is not None for threads in torch_threads):
            torch.set_num_threads(restore)


def _cpu_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _all_gather(obj) -> list:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]


def _progress_bar(total: int):
    """A tqdm bar counting images (with images/s) when the console is interactive, else nothing."""
    if not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="describing", dynamic_ncols=True, leave=False)
