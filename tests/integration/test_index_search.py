"""`hetretrieval-index` / `hetretrieval-search` on real heritage images: the index folder, incremental updates,
searches checked against a brute-force search of the saved descriptors, re-ranking, and the CLI's error line."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from hetretrieval.data.datasets import ImageRecord, list_images
from hetretrieval.errors import ConfigError, DataError
from hetretrieval.evaluation.collection import build_describer, index_collection, search_collection
from hetretrieval.extraction.engine import ExtractionEngine
from hetretrieval.index.collection import read_descriptors, read_faiss_index, read_table

# the same picture as seine.png, and images in the formats heritage collections hold (palette and RGBA PNG,
# 32-bit float TIFF, grayscale and tiny JPEGs)
COLLECTION = ("seine.jpg", "louvre.jpg", "notredame.jpg", "tuilerie.jpg", "box2.png", "cross.png",
              "Densite_AutoCal_Foc-210000_Cam-Argentique.tif", "logoAlegoria.jpg")


@pytest.fixture
def collection(heritage_root, tmp_path) -> Path:
    root = tmp_path / "collection"
    (root / "nested" / "deeper").mkdir(parents=True)
    for i, name in enumerate(COLLECTION):  # any layout: some images two folders down
        shutil.copy2(heritage_root / name, root / ("nested/deeper" if i % 3 == 2 else "") / name)
    (root / "nested" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


@pytest.fixture
def compose(tmp_path, cache_dir):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from hetretrieval.config import CONFIG_DIR

    def _compose(config_name: str, *overrides: str):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return hydra_compose(config_name, overrides=[f"paths.cache_dir={cache_dir}",
                                                         f"paths.log_dir={tmp_path / 'logs'}", *overrides])

    return _compose


def _index(compose, collection: Path, index: Path, *overrides: str) -> dict:
    return index_collection(compose("index", f"collection={collection}", f"index={index}", "extraction.max_size=160",
                                    "cache=false", *overrides))


def _search(compose, index: Path, query: Path, output: Path, *overrides: str) -> dict:
    return search_collection(compose("search", f"index={index}", f"query={query}", *overrides), output)


def _csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_index_then_search_finds_seine_jpg_first(compose, collection, heritage_root, tmp_path):
    index = tmp_path / "index"
    done = _index(compose, collection, index)
    assert done == {"images": 9, "new": 9, "changed": 0, "removed": 0, "described": 8, "skipped": 1, "indexed": 8,
                    "kind": "Flat", "descriptor_cache": "miss"}
    table = read_table(index)
    assert [e.path for e in table] == [str(p) for p in list_images(collection)]
    broken = [e for e in table if e.status == "skipped"]
    assert [Path(e.path).name for e in broken] == ["broken.jpg"] and "cannot read image header" in broken[0].reason
    config = OmegaConf.load(index / "config.yaml")
    assert config.version == 1 and config.extraction.max_size == 160 and config.faiss.kind == "Flat"
    assert read_faiss_index(index).ntotal == 8

    output = tmp_path / "search"
    results = _search(compose, index, heritage_root / "seine.png", output, "top_k=5")
    found = results[str(heritage_root / "seine.png")]
    assert Path(found[0].path).name == "seine.jpg" and found[0].similarity > 0.95 > found[1].similarity
    # brute force: the query described with the index's own config, against every saved descriptor
    describer = build_describer(config, "cpu")
    query = ExtractionEngine(describer.engine.network).extract(
        [ImageRecord(heritage_root / "seine.png", None)], describer.source).descriptors["descriptor"][0]
    descriptors = read_descriptors(index)
    described = np.array([e.image_id for e in table if e.status == "described"])
    similarity = descriptors[described] @ query
    order = described[np.argsort(-similarity, kind="stable")][:5]
    assert [n.image_id for n in found] == order.tolist()
    np.testing.assert_allclose([n.similarity for n in found], np.sort(similarity)[::-1][:5], atol=1e-5)
    rows = _csv(output / "results.csv")
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5] and rows[0]["path"].endswith("seine.jpg")
    assert (output / "contact_sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = _Page.parse(output / "results.html")
    assert len(page.data_images) == 6 and page.links_resolve(output)  # the query and its 5 results, embedded


def test_search_leaves_out_the_query_itself_when_it_is_indexed(compose, collection, tmp_path):
    index = tmp_path / "index"
    _index(compose, collection, index)
    found = _search(compose, index, collection / "seine.jpg", tmp_path / "search", "top_k=20")
    names = [Path(n.path).name for n in found[str(collection / "seine.jpg")]]
    assert "seine.jpg" not in names and len(names) == 7


def test_reindexing_a_grown_folder_describes_only_new_and_changed_images(compose, collection, heritage_root,
                                                                          tmp_path):
    index = tmp_path / "index"
    _index(compose, collection, index)
    before, before_table = read_descriptors(index), read_table(index)
    shutil.copy2(heritage_root / "arcTriomphe.jpg", collection / "arcTriomphe.jpg")
    changed = collection / "louvre.jpg"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    (collection / "tuilerie.jpg").unlink()
    done = _index(compose, collection, index)
    assert (done["new"], done["changed"], done["removed"], done["described"], done["indexed"]) == (1, 1, 1, 2, 8)
    table = read_table(index)
    assert table[: len(before_table)] != before_table  # louvre's and tuilerie's old rows are now removed
    status = {(Path(e.path).name, e.status) for e in table}
    assert {("louvre.jpg", "removed"), ("louvre.jpg", "described"), ("tuilerie.jpg", "removed"),
            ("arcTriomphe.jpg", "described")} <= status
    after = read_descriptors(index)
    np.testing.assert_array_equal(after[: len(before)], before)  # nothing described again but the two files
    kept = [e.image_id for e in table if e.status == "described"]
    louvre = [e.image_id for e in table if Path(e.path).name == "louvre.jpg"]
    np.testing.assert_allclose(after[louvre[1]], before[louvre[0]], atol=1e-6)  # same pixels, new mtime
    faiss_index = read_faiss_index(index)
    _, ids = faiss_index.search(after[kept], faiss_index.ntotal)
    assert sorted(set(ids.ravel().tolist())) == sorted(kept)
    again = _index(compose, collection, index)
    assert (again["new"], again["changed"], again["removed"], again["described"]) == (0, 0, 0, 0)


def test_reindexing_with_other_options_or_a_missing_index_is_refused(compose, collection, tmp_path):
    index = tmp_path / "index"
    _index(compose, collection, index)
    with pytest.raises(ConfigError, match=r"extraction.max_size=160"):
        index_collection(compose("index", f"collection={collection}", f"index={index}", "extraction.max_size=200"))
    with pytest.raises(DataError, match="not a hetretrieval index"):
        _search(compose, tmp_path / "nowhere", collection / "seine.jpg", tmp_path / "search")
    with pytest.raises(ConfigError, match="IVF-PQ .* needs at least 256"):
        _index(compose, collection, tmp_path / "ivf", "faiss.kind=IVF-PQ", "faiss.nlist=4", "faiss.m=8")


def test_rerank_by_orb_verification_puts_the_same_picture_first(compose, collection, heritage_root, tmp_path):
    index = tmp_path / "index"
    _index(compose, collection, index)
    results = _search(compose, index, heritage_root / "seine.png", tmp_path / "search", "top_k=3", "rerank=orb",
                      "rerank.top_k=5")
    found = results[str(heritage_root / "seine.png")]
    assert Path(found[0].path).name == "seine.jpg"
    inliers = [n.inliers for n in found]
    assert all(i is not None for i in inliers) and inliers == sorted(inliers, reverse=True)
    assert inliers[0] > 10 * max(inliers[1], 1)
    assert [r["inliers"] for r in _csv(tmp_path / "search" / "results.csv")] == [str(i) for i in inliers]


def test_search_cli_fails_in_one_line_on_a_folder_that_is_no_index(tmp_path):
    done = subprocess.run([sys.executable, "-m", "hetretrieval.cli.search", f"index={tmp_path}",
                           f"query={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (f"hetretrieval: '{tmp_path}' is not a hetretrieval index (no "
                                                    "config.yaml); build one with hetretrieval-index "
                                                    "collection=<folder> index=<folder>")


class _Page(HTMLParser):
    """The images and links of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.data_images: list[str] = []
        self.targets: list[str] = []

    @classmethod
    def parse(cls, path: Path) -> _Page:
        parsed = cls()
        parsed.feed(path.read_text(encoding="utf-8"))
        return parsed

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("src", "href"):
            if key in attrs:
                value = attrs[key]
                (self.data_images if value.startswith("data:image/") else self.targets).append(value)

    def links_resolve(self, folder: Path) -> bool:
        return all((folder / target).is_file() for target in self.targets)
