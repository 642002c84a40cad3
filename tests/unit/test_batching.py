"""Size buckets, DDP sharding and the de-duplicating gather."""

import numpy as np
import pytest
import torch

from hetretrieval.errors import ConfigError
from hetretrieval.extraction.batching import SizeBucketBatchSampler, collate_same_size, merge_gathered

SHAPES = [(4, 6), (6, 4), (4, 6), None, (4, 6), (6, 4), (5, 5)]


def test_buckets_hold_one_shape_and_cover_every_readable_image_once():
    batches = list(SizeBucketBatchSampler(SHAPES, batch_size=2))
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 4, 5, 6]
    assert all(len({SHAPES[i] for i in b}) == 1 for b in batches)


def test_batch_pixels_caps_each_bucket_and_keeps_at_least_one_image():
    shapes = [(10, 10)] * 7 + [(20, 20)] * 3 + [(40, 40)] * 2  # 100, 400 and 1,600 pixels
    batches = list(SizeBucketBatchSampler(shapes, batch_size=4, batch_pixels=800))
    # 800 px: 4 (the count cap) of 100 px, 2 of 400 px, and the 1,600-px images alone (over the cap)
    assert batches == [[0, 1, 2, 3], [4, 5, 6], [7, 8], [9], [10], [11]]
    assert list(SizeBucketBatchSampler(shapes, batch_size=4, batch_pixels=None)) == [
        [0, 1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11]]
    with pytest.raises(ConfigError, match="batch_pixels"):
        SizeBucketBatchSampler(shapes, batch_size=4, batch_pixels=0)


def test_ranks_get_disjoint_complete_shards():
    shards = [list(SizeBucketBatchSampler(SHAPES, 1, num_replicas=3, rank=r)) for r in range(3)]
    indices = [i for shard in shards for b in shard for i in b]
    assert sorted(indices) == [0, 1, 2, 4, 5, 6]


def test_merge_restores_order_and_drops_duplicates():
    parts = [(np.array([4, 0]), np.array([[4.0], [0.0]])), (np.array([2, 0]), np.array([[2.0], [9.0]]))]
    descriptors, valid = merge_gathered(parts, 5)
    np.testing.assert_array_equal(descriptors[:, 0], [0, 0, 2, 0, 4])
    np.testing.assert_array_equal(valid, [True, False, True, False, True])


def test_merge_in_chunks_into_an_allocated_array_keeps_first_occurrences(monkeypatch):
    monkeypatch.setattr("hetretrieval.extraction.batching.MERGE_ROWS", 2)
    parts = [(np.array([3, 1, 1, 3, 0]), np.array([[3.0], [1.0], [7.0], [8.0], [0.5]])),
             (np.array([2, 1]), np.array([[2.0], [9.0]]))]
    shapes = []

    def allocate(shape):
        shapes.append(shape)
        return np.zeros(shape, dtype=np.float16)

    descriptors, valid = merge_gathered(parts, 5, "gem", allocate)
    assert shapes == [(5, 1)] and descriptors.dtype == np.float16
    np.testing.assert_array_equal(descriptors[:, 0], [0.5, 1, 2, 3, 0])
    np.testing.assert_array_equal(valid, [True, True, True, True, False])
    with pytest.raises(RuntimeError, match="gem descriptors of different sizes"):
        merge_gathered([(np.array([0]), np.zeros((1, 2))), (np.array([1]), np.zeros((1, 3)))], 2, "gem")


def test_keep_first_keeps_each_images_first_value():
    from hetretrieval.extraction.batching import keep_first

    merged = [None, "kept", None, None]
    keep_first(merged, [(0, "a"), (1, "b"), (0, "c"), (3, "d")])
    assert merged == ["a", "kept", None, "d"]


def test_collate_separates_failures():
    items = [{"index": 0, "image": torch.zeros(3, 2, 2), "error": None},
             {"index": 1, "image": None, "error": "bad"}]
    batch = collate_same_size(items)
    assert batch["index"].tolist() == [0] and batch["images"].shape == (1, 3, 2, 2)
    assert batch["failed"] == [(1, "bad")]


def test_bad_crop_box_is_reported_and_never_loaded(tmp_path):
    from PIL import Image

    from hetretrieval.data.datasets import ImageRecord
    from hetretrieval.extraction.batching import ImagePlan, ImageSource
    from hetretrieval.extraction.engine import ExtractionEngine
    from hetretrieval.models.local.orb import OrbExtractor

    for name in ("a.png", "b.png"):
        Image.new("RGB", (20, 10), "red").save(tmp_path / name)
    records = [ImageRecord(tmp_path / "a.png", "x", {"crop": "2,2,12,8"}),
               ImageRecord(tmp_path / "b.png", "x", {"crop": "not,a,box"})]
    plan = ImagePlan.scan(records, ImageSource(max_size=None))
    assert list(plan.unreadable) == [1] and "x1,y1,x2,y2" in plan.unreadable[1]
    (batch,) = list(ExtractionEngine(None, {"orb": OrbExtractor()}, batch_size=2).loader(records, plan))
    assert batch["index"].tolist() == [0] and batch["images"].shape == (1, 3, 6, 10)


def test_ids_restrict_the_batches():
    batches = list(SizeBucketBatchSampler(SHAPES, batch_size=4, ids=[5, 0, 1]))
    assert sorted(i for b in batches for i in b) == [0, 1, 5]


def test_aspect_shape_keeps_capped_longer_side_and_snaps_to_stride():
    from hetretrieval.extraction.batching import aspect_shape

    assert aspect_shape(512, 384, 32, 512) == (512, 384)  # 3/4 is a bucket ratio, both sides multiples
    assert aspect_shape(300, 512, 32, 512) == (320, 512)  # 0.586 -> 3/5 -> 307.2 -> 320
    assert aspect_shape(227, 227, 32, 800) == (192, 192)  # levels 800, 576, 384, 288, 192: 192 is nearest in log
    for height, width in [(511, 97), (33, 700), (800, 799), (1, 1)]:
        shape = aspect_shape(height, width, 14, 800)
        assert all(side % 14 == 0 and side >= 14 for side in shape)
        assert (shape[0] >= shape[1]) == (height >= width)


def test_read_ahead_yields_in_order_and_reraises_errors():
    from hetretrieval.extraction.engine import ReadAhead

    ahead = ReadAhead(range(7), depth=2)
    assert len(ahead) == 7 and list(ahead) == list(range(7)) and list(ahead) == list(range(7))  # re-iterable

    class Failing:
        def __len__(self):
            return 2

        def __iter__(self):
            yield 1
            raise ValueError("bad batch")

    reader = iter(ReadAhead(Failing(), depth=2))
    assert next(reader) == 1
    with pytest.raises(ValueError, match="bad batch"):
        next(reader)
    abandoned = iter(ReadAhead(range(100), depth=1))
    assert next(abandoned) == 0
    abandoned.close()  # the producer thread ends instead of blocking on a full queue


def test_in_threads_maps_every_item_once_in_its_threads_and_restores_torch_threads():
    from hetretrieval.extraction.engine import in_threads

    before = torch.get_num_threads()
    seen = list(in_threads(range(50), lambda item: (item, torch.get_num_threads()), torch_threads=(1, 2, 1)))
    assert sorted(item for item, _ in seen) == list(range(50))  # each item once, whichever thread took it
    assert {threads for _, threads in seen} <= {1, 2}
    assert torch.get_num_threads() == before

    def fail_on_seven(item):
        if item == 7:
            raise ValueError("bad item 7")
        return item

    with pytest.raises(ValueError, match="bad item 7"):
        list(in_threads(range(20), fail_on_seven, torch_threads=(1, 1)))
    assert torch.get_num_threads() == before


def test_streams_stop_and_restore_torch_threads_when_the_consumer_fails(tmp_path, monkeypatch):
    """An error while collecting a streamed batch ends the extraction at once: no stream thread is left
    running and torch's thread count is what it was."""
    import threading

    from PIL import Image

    from hetretrieval.data.datasets import ImageRecord
    from hetretrieval.extraction.batching import ImageSource
    from hetretrieval.extraction.engine import Collector, ExtractionEngine
    from hetretrieval.models.local.orb import OrbExtractor

    for i in range(8):
        Image.new("RGB", (20 + i, 10), "red").save(tmp_path / f"{i}.png")
    records = [ImageRecord(tmp_path / f"{i}.png", "x") for i in range(8)]

    def fail(self, output):
        raise RuntimeError("collector broke")

    monkeypatch.setattr(Collector, "add", fail)
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="collector broke") as failure:  # its traceback keeps extract's frame
        ExtractionEngine(None, {"orb": OrbExtractor()}, progress=False, streams=2).extract(records, ImageSource())
    assert failure.traceback and torch.get_num_threads() == before
    assert not [t for t in threading.enumerate() if t.name.startswith("hetretrieval-extract")]


def test_streams_share_out_torch_threads(monkeypatch):
    from hetretrieval.extraction.engine import MAX_AUTO_STREAMS, ExtractionEngine
    from hetretrieval.models.local.orb import OrbExtractor

    monkeypatch.setattr(torch, "get_num_threads", lambda: 5)
    assert ExtractionEngine(None, {"orb": OrbExtractor()}, streams=2).stream_threads() == [3, 2]
    assert ExtractionEngine(None, {"orb": OrbExtractor()}, streams=1).stream_threads() == [5]
    assert ExtractionEngine(None, {"orb": OrbExtractor()}, streams=8).stream_threads() == [1] * 8
    assert ExtractionEngine(None, {"orb": OrbExtractor()}).stream_threads() == [2] + [1] * (MAX_AUTO_STREAMS - 1)


def test_decoding_is_read_ahead_only_when_a_core_is_free(monkeypatch):
    """With torch's threads on every core a decoding thread stalls them, so the engine then decodes in line."""
    from hetretrieval.extraction.batching import ImagePlan, ImageSource
    from hetretrieval.extraction.engine import ExtractionEngine, ReadAhead, _cpu_cores
    from hetretrieval.models.local.orb import OrbExtractor

    engine = ExtractionEngine(None, {"orb": OrbExtractor()})
    plan = ImagePlan.scan([], ImageSource())
    monkeypatch.setattr(torch, "get_num_threads", lambda: _cpu_cores())
    assert not isinstance(engine.batches([], plan), ReadAhead)
    monkeypatch.setattr(torch, "get_num_threads", lambda: _cpu_cores() - 1)
    assert isinstance(engine.batches([], plan), ReadAhead)
    assert not isinstance(ExtractionEngine(None, {"orb": OrbExtractor()}, num_workers=1).batches([], plan),
                          ReadAhead)  # worker processes decode instead
