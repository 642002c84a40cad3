"""Distributed extraction (simulated on CPU with two processes) gives exactly the single-process results: each rank
writes its shard (into the descriptor store, or the run folder without one) and rank 0 merges them."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_BUILTIN
from hetretrieval.cli.evaluate import evaluate
from hetretrieval.config import instantiate
from hetretrieval.extraction.batching import ImagePlan, ImageSource, SizeBucketBatchSampler


def test_ddp_sim_matches_single_process(compose_eval, tmp_path, cache_dir):
    single = evaluate(compose_eval(*TINY_BUILTIN, "cache=false", "paths.output_dir=" + str(tmp_path / "single")))
    store = tmp_path / "store"  # a store of its own, so the distributed run describes every image
    evaluate(compose_eval(*TINY_BUILTIN, "trainer=ddp_sim", f"paths.cache_dir={store}",
                          f"dataset.cache_dir={cache_dir}", "paths.output_dir=" + str(tmp_path / "ddp")))
    distributed = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert distributed["descriptor_cache"] == "miss"
    assert distributed["counts"] == single["counts"] and distributed["skipped"] == []
    assert distributed["mAP"] == pytest.approx(single["mAP"], abs=1e-6)
    expected = np.load(tmp_path / "single" / "descriptors.npy")
    np.testing.assert_allclose(np.load(tmp_path / "ddp" / "descriptors.npy"), expected, atol=1e-5)
    (stored,) = (store / "descriptors").glob("*.descriptors.npy")  # the merged shards, as a normal store entry
    np.testing.assert_allclose(np.load(stored), expected, atol=1e-5)
    assert not list((store / "descriptors").glob("*.shards"))  # removed once merged


def test_ddp_sim_carries_each_ranks_skipped_images(compose_eval, tmp_path):
    """Without a store the shards go to the run folder; a decode failure on either rank reaches the summary."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for label, count in (("a", 3), ("b", 2)):
        (root / label).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(root / label / f"{i}.jpg")
        data = (root / label / "0.jpg").read_bytes()
        (root / label / "truncated.jpg").write_bytes(data[: len(data) // 2])  # a whole header, half the pixels
    overrides = ("dataset=folder", f"dataset.root={root}", "extraction.max_size=64", "extraction.batch_size=1",
                 "cache=false")
    cfg = compose_eval(*overrides)
    records = instantiate(cfg.dataset).records
    plan = ImagePlan.scan(records, ImageSource(max_size=64))
    truncated = {i for i, record in enumerate(records) if record.path.name == "truncated.jpg"}
    for rank in (0, 1):  # one truncated image in each rank's share
        share = {i for batch in SizeBucketBatchSampler(plan.shapes, 1, 2, rank) for i in batch}
        assert len(share & truncated) == 1
    single = evaluate(compose_eval(*overrides, "paths.output_dir=" + str(tmp_path / "single")))
    evaluate(compose_eval(*overrides, "trainer=ddp_sim", "paths.output_dir=" + str(tmp_path / "ddp")))
    distributed = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert {entry["path"].split("/")[-2] for entry in distributed["skipped"]} == {"a", "b"}
    assert distributed["skipped"] == single["skipped"] and distributed["counts"] == single["counts"]
    assert distributed["counts"]["described"] == 5
    np.testing.assert_allclose(np.load(tmp_path / "ddp" / "descriptors.npy"),
                               np.load(tmp_path / "single" / "descriptors.npy"), atol=1e-5)
    assert not list((tmp_path / "ddp").glob("*.shards"))


def test_rank_zero_describes_a_killed_ranks_images_again(compose_eval, tmp_path):
    """Rank 1 never completed its shard: rank 0 merges its own shard with rank 1's images described anew, and
    gets exactly the single-process descriptors (without DDP: the rank-0 half of `ExtractionModule`)."""
    from types import SimpleNamespace

    from hetretrieval.extraction.engine import ExtractionEngine
    from hetretrieval.extraction.lightning import ExtractionModule
    from hetretrieval.extraction.store import ShardSet
    from hetretrieval.models.backbones import Backbone
    from hetretrieval.models.network import RetrievalNetwork
    from hetretrieval.models.pooling.heads import GeM

    records = instantiate(compose_eval(*TINY_BUILTIN).dataset).records
    plan = ImagePlan.scan(records, ImageSource(max_size=64))
    engine = ExtractionEngine(RetrievalNetwork(Backbone("tf_efficientnet_lite0"), {"gem": GeM()}), batch_size=2)
    single = engine.extract(records, plan)
    module = ExtractionModule(engine, records, plan, shards=ShardSet(tmp_path, "k" * 64))
    module._trainer = SimpleNamespace(world_size=2)  # what `_describe_again` reads of the trainer
    collector = engine.collector(len(records), plan)
    engine.eval()  # as under `trainer.predict`
    for batch in engine.loader(records, plan, rank=0, world_size=2):
        collector.add(engine.describe_batch(batch))
    assert module.shards.write(0, 2, collector.part())
    merged = module.shards.merge(2, plan, module._describe_again)
    assert merged.complete and merged.valid.all() and merged.skipped == {}
    np.testing.assert_allclose(merged.descriptors["gem"], single.descriptors["gem"], atol=1e-5)
