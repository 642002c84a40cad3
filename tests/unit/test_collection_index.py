"""The persistent collection index: which files a re-index describes, and the faiss index it keeps."""

from __future__ import annotations

import os

import numpy as np
import pytest

from hetretrieval.errors import ConfigError
from hetretrieval.index.collection import (
    DESCRIBED,
    REMOVED,
    ImageEntry,
    IndexOptions,
    Update,
    build_faiss_index,
    file_identity,
    plan_update,
    remove_from_index,
    search_index,
)


def test_plan_update_finds_new_changed_and_vanished_files(tmp_path):
    files = {name: tmp_path / name for name in ("kept.jpg", "changed.jpg", "gone.jpg", "new.jpg", "old.jpg")}
    for path in files.values():
        path.write_bytes(b"x")
    entries = [ImageEntry(i, str(files[name]), *file_identity(files[name]), DESCRIBED)
               for i, name in enumerate(("kept.jpg", "changed.jpg", "gone.jpg"))]
    entries.append(ImageEntry(3, str(files["old.jpg"]), 1, 1, REMOVED, "file changed on disk"))
    files["changed.jpg"].write_bytes(b"xy")
    files["gone.jpg"].unlink()
    now = [files[name] for name in ("changed.jpg", "kept.jpg", "new.jpg", "old.jpg")]
    assert plan_update(entries, now) == Update((files["changed.jpg"], files["new.jpg"], files["old.jpg"]), (1,), (2,))
    stat = files["kept.jpg"].stat()
    os.utime(files["kept.jpg"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # same bytes, touched: described again
    assert plan_update(entries, now).changed == (1, 0)  # in the order the files are found


def _unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_flat_index_returns_the_brute_force_ranking_under_image_ids():
    database, queries = _unit_rows(50, 16, 0), _unit_rows(4, 16, 1)
    ids = np.arange(50) * 3 + 7  # image ids need not be positions
    index = build_faiss_index(database, ids, IndexOptions())
    scores, found = search_index(index, queries, 10, gpu="false")
    expected = np.argsort(-(queries @ database.T), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(found, ids[expected])
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ database.T, expected, axis=1), atol=1e-5)
    assert remove_from_index(index, [int(ids[expected[0, 0]])]) == 1
    assert search_index(index, queries[:1], 1, gpu="false")[1][0, 0] == ids[expected[0, 1]]


def test_ivfpq_finds_near_duplicates_and_refuses_too_few_images():
    database = _unit_rows(600, 32, 2)
    queries = database[:20] + 0.01 * _unit_rows(20, 32, 3)
    options = IndexOptions(kind="IVF-PQ", nlist=8, m=8, nbits=6, nprobe=8)
    _, found = search_index(build_faiss_index(database, np.arange(600), options), queries, 1, gpu="false")
    assert (found[:, 0] == np.arange(20)).mean() >= 0.9
    with pytest.raises(ConfigError, match="needs at least 64"):
        build_faiss_index(database[:63], np.arange(63), options)
    with pytest.raises(ConfigError, match="must divide"):
        build_faiss_index(database, np.arange(600), IndexOptions(kind="IVF-PQ", nlist=8, m=5, nbits=6))
    with pytest.raises(ConfigError, match="faiss.kind"):
        IndexOptions(kind="HNSW")
