"""DDP extraction shards (`ShardSet`): rank 0 merges every rank's shard in dataset order, carries each rank's
skipped images, and never merges a shard that did not complete (its rank's images are described again)."""

import json
import logging

import numpy as np
import pytest

from hetretrieval.extraction.batching import ImagePlan, ImageSource
from hetretrieval.extraction.engine import Extraction
from hetretrieval.extraction.store import CachedHeads, DescriptorStore, ShardSet
from hetretrieval.models.local.features import LocalFeatures

N = 7
UNREADABLE = {6: "cannot identify image file"}


def _plan() -> ImagePlan:
    shapes = [(16, 16)] * (N - 1) + [None]
    return ImagePlan(ImageSource(max_size=16), shapes, [None] * N, [16] * (N - 1) + [None], dict(UNREADABLE))


def _features(index: int) -> LocalFeatures:
    rng = np.random.default_rng(index)
    n = index % 3  # image 0 and 3 have no keypoint at all
    return LocalFeatures(rng.random((n, 2), np.float32), rng.random((n, 4), np.float32),
                         rng.random(n, np.float32), (8 + index, 9))


REFERENCE = np.random.default_rng(0).standard_normal((N, 5)).astype(np.float32)
# rank 0 has images 2, 0 (in its batches' order), rank 1 images 5, 1, 4 and the decode failure 3
SHARES = {0: ([2, 0], {}), 1: ([5, 1, 4], {3: "image file is truncated"})}


def _part(rank: int) -> tuple:
    indices, skipped = SHARES[rank]
    return (np.array(indices, np.int64), {"gem": REFERENCE[indices]}, {"orb": {i: _features(i) for i in indices}},
            dict(skipped), 1.0 + rank)


def _describe_again(calls: list):
    def describe(rank: int) -> Extraction:
        calls.append(rank)
        indices, skipped = SHARES[rank]
        extraction = Extraction(np.isin(np.arange(N), indices), {**UNREADABLE, **skipped})
        extraction.descriptors["gem"] = np.where(extraction.valid[:, None], REFERENCE, 0).astype(np.float32)
        extraction.local_features["orb"] = [_features(i) if i in indices else None for i in range(N)]
        return extraction
    return describe


def _assert_merged(merged: Extraction, dtype=np.float32, atol=0.0) -> None:
    described = np.array([0, 1, 2, 4, 5])
    assert merged.complete
    assert merged.valid.tolist() == [i in described for i in range(N)]
    assert merged.skipped == {3: "image file is truncated", 6: "cannot identify image file"}
    assert merged.descriptors["gem"].dtype == dtype and merged.descriptors["gem"].shape == (N, 5)
    expected = np.zeros_like(REFERENCE)
    expected[described] = REFERENCE[described]
    np.testing.assert_allclose(merged.descriptors["gem"], expected, atol=atol, rtol=0)
    for index, features in enumerate(merged.local_features["orb"]):
        if index not in described:
            assert features is None
            continue
        reference = _features(index)
        assert features.image_size == reference.image_size
        for name in ("keypoints", "descriptors", "scores"):
            np.testing.assert_array_equal(getattr(features, name), getattr(reference, name))


@pytest.mark.parametrize(("dtype", "atol"), [("float32", 0.0), ("float16", 2e-3)])
def test_shards_merge_in_dataset_order_with_every_ranks_skips(tmp_path, dtype, atol):
    shards = ShardSet(tmp_path, "k" * 64, dtype)
    assert all(shards.write(rank, 2, _part(rank)) for rank in (1, 0))
    calls: list = []
    merged = shards.merge(2, _plan(), _describe_again(calls))
    assert calls == []  # both shards complete: nothing described again
    assert isinstance(merged.descriptors["gem"], np.memmap)  # never one in-memory copy of the whole set
    _assert_merged(merged, np.dtype(dtype), atol)
    assert merged.seconds >= 2.0  # the slowest rank
    shards.remove()
    assert not shards.folder.exists()


@pytest.mark.parametrize("damage", ["no marker", "no descriptors", "other world size", "other key", "short"])
def test_an_incomplete_or_foreign_shard_is_described_again_never_merged(tmp_path, caplog, damage):
    shards = ShardSet(tmp_path, "k" * 64)
    for rank in (0, 1):
        shards.write(rank, 2, _part(rank))
    np.save(shards.file(2, 1, "head-gem.npy"), np.full((3, 5), 7.0, np.float32))  # what must never be merged
    marker = shards.file(2, 1, "done.json")
    facts = json.loads(marker.read_text())
    if damage == "no marker":  # the rank was killed before its marker
        marker.unlink()
    elif damage == "no descriptors":
        shards.file(2, 1, "head-gem.npy").unlink()
    elif damage == "short":
        np.save(shards.file(2, 1, "head-gem.npy"), np.full((2, 5), 7.0, np.float32))
    else:
        facts.update({"world_size": 3} if damage == "other world size" else {"key": "x" * 64})
        marker.write_text(json.dumps(facts))
    calls: list = []
    with caplog.at_level(logging.WARNING):
        merged = shards.merge(2, _plan(), _describe_again(calls))
    assert calls == [1]
    assert "extraction shard 2-1" in caplog.text and "describing its images again, never merging it" in caplog.text
    _assert_merged(merged)


def test_a_shard_of_another_world_size_is_never_read(tmp_path):
    """Shards left by a run on 4 ranks (`4-r.*`) sit beside this run's `2-r.*` and are ignored."""
    shards = ShardSet(tmp_path, "k" * 64)
    for rank in (0, 1):
        shards.write(rank, 2, _part(rank))
    stale = (np.array([0, 1, 2, 4, 5]), {"gem": np.ones((5, 5), np.float32)}, {}, {}, 0.0)
    shards.write(0, 4, stale)
    calls: list = []
    _assert_merged(shards.merge(2, _plan(), _describe_again(calls)))
    assert calls == []


def test_a_failed_shard_write_is_reported_and_the_rank_described_again(tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        assert not ShardSet(blocked, "k" * 64).write(1, 2, _part(1))
    assert "could not write the extraction shard of rank 1" in caplog.text


def test_shards_sit_in_the_store_or_in_the_run_folder_without_one(tmp_path):
    for root in (tmp_path / "store", None):
        cache = CachedHeads(DescriptorStore(root, "float16"), {"gem": "a" * 64, "orb": "b" * 64}, N)
        shards = cache.shards(tmp_path / "run")
        assert shards.folder.parent == (root if root is not None else tmp_path / "run")
        assert shards.dtype == "float16" and shards.folder.name.endswith(".shards")
    other = CachedHeads(DescriptorStore(None), {"gem": "a" * 64}, N).shards(tmp_path)
    assert other.key != shards.key  # keyed by the heads it extracts
