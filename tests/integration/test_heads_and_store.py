"""Many heads per backbone pass, the descriptor store and `from_run` re-scoring, end to end on real images."""

import csv
import json
import logging
import os

import numpy as np
import pytest
import torch

from conftest import TINY_BUILTIN
from hetretrieval.cli.evaluate import evaluate
from hetretrieval.data.datasets import ImageRecord
from hetretrieval.data.images import save_image
from hetretrieval.errors import ConfigError
from hetretrieval.extraction.batching import ImageSource
from hetretrieval.extraction.engine import ExtractionEngine
from hetretrieval.extraction.store import CachedHeads, DescriptorStore, extraction_fingerprint
from hetretrieval.models.backbones import Backbone
from hetretrieval.models.network import RetrievalNetwork
from hetretrieval.models.pooling.heads import MAC, GeM

HEADS = ("mac", "spoc", "gem", "rmac")


def _summary(run):
    return json.loads((run / "summary.json").read_text())


def test_four_heads_in_one_pass_equal_four_single_runs(compose_eval, tmp_path):
    multi = evaluate(compose_eval(*TINY_BUILTIN, "heads=[mac,spoc,gem,rmac]", "cache=false",
                                  f"paths.output_dir={tmp_path / 'multi'}"))
    assert set(multi) == set(HEADS)
    for head in HEADS:
        single = evaluate(compose_eval(*TINY_BUILTIN, f"pooling={head}", "cache=false",
                                       f"paths.output_dir={tmp_path / head}"))
        np.testing.assert_allclose(np.load(tmp_path / "multi" / head / "descriptors.npy"),
                                   np.load(tmp_path / head / "descriptors.npy"), atol=1e-6, rtol=0)
        assert multi[head]["mAP"] == pytest.approx(single["mAP"], abs=1e-6)
        assert _summary(tmp_path / "multi" / head)["descriptor"] == head
    with (tmp_path / "multi" / "comparison.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and set(HEADS) <= set(rows[0])
    assert "| class | n_queries | mac | spoc | gem | rmac | Avg |" in (tmp_path / "multi" / "comparison.md").read_text()


def test_each_head_is_its_own_wandb_run_in_one_group(compose_eval, tmp_path):
    evaluate(compose_eval(*TINY_BUILTIN, "heads=[mac,gem]", "logger=wandb"))
    for head in ("mac", "gem"):
        runs = list((tmp_path / "run" / head / "wandb").glob("offline-run-*"))
        assert len(runs) == 1


def test_heads_are_pooling_options_and_keep_the_pooling_overrides(compose_eval, tmp_path):
    summaries = evaluate(compose_eval(*TINY_BUILTIN, "heads=[mac,gem]", "pooling=gem", "pooling.p=1.0"))
    spoc = evaluate(compose_eval(*TINY_BUILTIN, "pooling=spoc", f"paths.output_dir={tmp_path / 'spoc'}"))
    # GeM with p = 1 is SPoC: the gem head took the pooling.p override
    assert summaries["gem"]["mAP"] == pytest.approx(spoc["mAP"], abs=1e-5)
    with pytest.raises(ConfigError, match="unknown pooling option 'gemm'"):
        evaluate(compose_eval(*TINY_BUILTIN, "heads=[mac,gemm]", f"paths.output_dir={tmp_path / 'bad'}"))


def test_identical_rerun_hits_the_store_and_any_change_misses(compose_eval, tmp_path):
    cache = tmp_path / "store"
    runs = iter(range(100))

    def run(*overrides):
        return evaluate(compose_eval(*TINY_BUILTIN, f"paths.cache_dir={cache}", "dataset.cache_dir=" + str(cache),
                                     f"paths.output_dir={tmp_path / str(next(runs))}", *overrides))

    first = run()
    assert first["descriptor_cache"] == "miss"
    again = run()
    assert again["descriptor_cache"] == "hit" and again["mAP"] == first["mAP"]
    assert again["timings"]["images_per_s"] is None
    np.testing.assert_array_equal(np.load(tmp_path / "0" / "descriptors.npy"), np.load(tmp_path / "1" / "descriptors.npy"))
    assert run("pooling.p=4.0")["descriptor_cache"] == "miss"
    assert run("extraction.max_size=48")["descriptor_cache"] == "miss"
    assert run("cache=false")["descriptor_cache"] == "miss"
    image = sorted(cache.glob("builtin-*/**/*.png"))[0]
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert run()["descriptor_cache"] == "miss"
    assert run()["descriptor_cache"] == "hit"


def test_a_float16_store_is_memory_mapped_and_scores_like_float32(compose_eval, tmp_path):
    cache = tmp_path / "store"

    def run(name, *overrides):
        return evaluate(compose_eval(*TINY_BUILTIN, f"paths.cache_dir={cache}", f"dataset.cache_dir={cache}",
                                     f"paths.output_dir={tmp_path / name}", *overrides))

    fresh = run("fresh", "store.dtype=float16")  # a miss: scored on the float32 descriptors just extracted
    assert fresh["descriptor_cache"] == "miss"
    (stored,) = cache.glob("descriptors/*.descriptors.npy")
    assert np.load(stored, mmap_mode="r").dtype == np.float16
    reread = run("reread", "store.dtype=float16")
    assert reread["descriptor_cache"] == "hit"
    assert reread["mAP"] == pytest.approx(fresh["mAP"], abs=1e-3)
    np.testing.assert_allclose(np.load(tmp_path / "reread" / "descriptors.npy"),
                               np.load(tmp_path / "fresh" / "descriptors.npy"), atol=1e-3, rtol=0)
    assert run("float32")["descriptor_cache"] == "miss"  # the dtype is part of the key
    with pytest.raises(ConfigError, match="store.dtype"):
        run("bad", "store.dtype=int8")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    records = []
    for i in range(4):
        path = root / f"{i}.png"
        save_image(torch.rand(3, 40, 56, generator=generator), path)
        records.append(ImageRecord(path, f"c{i % 2}", {}))
    return records


@pytest.fixture(scope="module")
def backbone():
    return Backbone("tf_efficientnet_lite0", pretrained=False)


def _keys(records, backbone, head, source=None, scales=(1.0,)):
    source = source or ImageSource(max_size=48)
    return DescriptorStore(None).key(extraction_fingerprint(records, source, backbone, scales), "head", head)


def test_every_fingerprint_component_changes_the_key(images, backbone, tmp_path):
    base = _keys(images, backbone, GeM())
    assert _keys(images, backbone, GeM()) == base
    changed = {
        "head config": _keys(images, backbone, GeM(p=4.0)),
        "head kind": _keys(images, backbone, MAC()),
        "max_size": _keys(images, backbone, GeM(), ImageSource(max_size=40)),
        "max_pixels": _keys(images, backbone, GeM(), ImageSource(max_size=48, max_pixels=10**6)),
        "scales": _keys(images, backbone, GeM(), scales=(1.0, 0.5)),
        "crop box": _keys([images[0], ImageRecord(images[1].path, "c1", {"crop": "0,0,20,20"}), *images[2:]],
                          backbone, GeM()),
        "image set": _keys(images[:3], backbone, GeM()),
    }
    other = Backbone("tf_efficientnet_lite0", pretrained=False)
    with torch.no_grad():
        other.model.conv_stem.weight[0, 0, 0, 0] += 1e-3
    changed["weights"] = _keys(images, other, GeM())
    head_state = GeM()
    with torch.no_grad():
        head_state.p += 1e-4  # same config, other state (a fine-tuned p)
    changed["head state"] = _keys(images, backbone, head_state)
    copy = tmp_path / "copy.png"
    copy.write_bytes(images[0].path.read_bytes())
    changed["image path"] = _keys([ImageRecord(copy, "c0", {}), *images[1:]], backbone, GeM())
    assert all(key != base for key in changed.values()), [name for name, key in changed.items() if key == base]
    assert len(set(changed.values())) == len(changed)
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10**9))  # touched: mtime differs
    assert _keys([ImageRecord(copy, "c0", {}), *images[1:]], backbone, GeM()) != changed["image path"]


def test_a_truncated_entry_is_reported_removed_and_rebuilt(images, backbone, tmp_path, caplog):
    store = DescriptorStore(tmp_path / "store")
    engine = ExtractionEngine(RetrievalNetwork(backbone, {"gem": GeM()}), batch_size=2, progress=False)
    source = ImageSource(max_size=48)
    key = store.key(extraction_fingerprint(images, source, backbone, (1.0,)), "gem", GeM())
    extraction = engine.extract(images, source)
    path = store.save("gem", key, extraction)
    assert CachedHeads(store, {"gem": key}, len(images)).hits == {"gem"}
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        cached = CachedHeads(store, {"gem": key}, len(images))
    assert cached.missing == ["gem"] and not path.exists()
    assert "unreadable" in caplog.text and str(path) in caplog.text
    cached.complete(extraction)  # rebuilt by the next complete extraction
    reloaded = CachedHeads(store, {"gem": key}, len(images))
    assert reloaded.hits == {"gem"}
    np.testing.assert_array_equal(reloaded.complete(None).descriptors["gem"], extraction.descriptors["gem"])
    # an entry of another key under this name (a collision or a stale copy) is not used either
    path.write_bytes(next(tmp_path.glob("store/*.npz")).read_bytes())
    assert CachedHeads(store, {"gem": key[:-1] + "0"}, len(images)).missing == ["gem"]


def test_an_incomplete_extraction_is_never_stored(images, backbone, tmp_path):
    store = DescriptorStore(tmp_path / "store")
    extraction = ExtractionEngine(RetrievalNetwork(backbone, {"gem": GeM()}), progress=False).extract(
        images, ImageSource(max_size=48), ids=[0, 1])
    assert extraction.complete and extraction.valid.tolist() == [True, True, False, False]
    extraction.complete = False  # as after fast_dev_run
    assert store.save("gem", "k" * 64, extraction) is None and not (tmp_path / "store").exists()


def test_from_run_rescores_saved_descriptors_exactly(compose_eval, tmp_path, heritage_root):
    original = evaluate(compose_eval("dataset=heritage_wild", "extraction.max_size=128",
                                     f"paths.output_dir={tmp_path / 'original'}"))
    rescored = evaluate(compose_eval(f"from_run={tmp_path / 'original'}", f"paths.output_dir={tmp_path / 'again'}"))
    for key in ("mAP", "class_mAP", "mP@1", "mP@5", "mR@10", "counts", "skipped", "descriptor", "backbone"):
        assert rescored[key] == original[key], key
    assert rescored["descriptor_cache"] == "from_run"
    with (tmp_path / "original" / "per_query_ap.csv").open() as a, (tmp_path / "again" / "per_query_ap.csv").open() as b:
        assert list(csv.DictReader(a)) == list(csv.DictReader(b))
    other = evaluate(compose_eval(f"from_run={tmp_path / 'original'}", "evaluation.ks=[2,3]",
                                  f"paths.output_dir={tmp_path / 'ks'}"))
    assert other["mAP"] == original["mAP"] and "mP@2" in other and "mP@1" not in other


def test_from_run_of_a_multi_head_run_rescores_every_head(compose_eval, tmp_path):
    evaluate(compose_eval(*TINY_BUILTIN, "heads=[mac,gem]", f"paths.output_dir={tmp_path / 'multi'}"))
    rescored = evaluate(compose_eval(f"from_run={tmp_path / 'multi'}", "evaluation.top_k=3",
                                     f"paths.output_dir={tmp_path / 'again'}"))
    assert set(rescored) == {"mac", "gem"}
    for head in ("mac", "gem"):
        assert rescored[head]["mAP"] == _summary(tmp_path / "multi" / head)["mAP"]
        assert np.load(tmp_path / "again" / head / "neighbours.npy").shape[1] == 3
