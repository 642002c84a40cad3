"""Exact search (blocked GEMM, stable ties, exclusion before sorting, float16 / memory-mapped databases) against
dense float64 references, and the approximate short-lists (IVF-PQ, HNSW) against the exact search."""

from types import SimpleNamespace

import numpy as np
import pytest

from hetretrieval.errors import ConfigError
from hetretrieval.index.search import (
    GPU_MAX_K,
    approximate_parameters,
    approximate_rankings,
    build_approximate_index,
    iter_rankings,
    on_gpus,
    select_rows,
    similarity_batches,
    stable_top_k,
)
from hetretrieval.models.pooling.functional import l2n


def _random_unit(n, d, seed):
    import torch
    return l2n(torch.randn(n, d, generator=torch.Generator().manual_seed(seed))).numpy()


def _tied(n, d, seed):
    """Vectors with coordinates in {-0.5, 0, 0.5}: inner products are exact in float32, and tie often."""
    return (np.random.default_rng(seed).integers(-1, 2, size=(n, d)) / 2).astype(np.float32)


def _reference(queries, database, exclude=None):
    """Stable descending ranking of float64 inner products, the excluded entry at -inf (so last)."""
    scores = queries.astype(np.float64) @ database.astype(np.float64).T
    if exclude is not None:
        rows = np.flatnonzero(exclude >= 0)
        scores[rows, exclude[rows]] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable"), scores


def _clustered(n, d, n_clusters, seed, latent=4, spread=0.3):
    """Unit vectors with structure, as descriptors have: a Gaussian mixture in a `latent`-d space, projected."""
    rng = np.random.default_rng(seed)
    projection = rng.standard_normal((latent, d))
    centres = rng.standard_normal((n_clusters, latent))
    points = (centres[rng.integers(n_clusters, size=n)] + spread * rng.standard_normal((n, latent))) @ projection
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def test_full_rankings_match_dense_argsort_in_any_batch_size():
    queries, database = _random_unit(13, 8, 0), _random_unit(40, 8, 1)
    expected, _ = _reference(queries, database)
    for entries in (40, 3 * 40, 1 << 20):
        batches = list(iter_rankings(queries, database, max_batch_entries=entries))
        positions = np.concatenate([b.positions for b in batches])
        np.testing.assert_array_equal(positions, expected)
        assert all(np.all(np.diff(b.scores, axis=1) <= 1e-6) for b in batches)


def test_ties_keep_the_lower_position_and_the_excluded_entry_goes_last():
    database = _tied(60, 4, 3)
    queries = database[:20]
    exclude = np.where(np.arange(20) % 3 == 0, -1, np.arange(20))
    expected, scores = _reference(queries, database, exclude)
    assert (np.diff(np.sort(scores, axis=1), axis=1) == 0).mean() > 0.5  # the case is tie-heavy
    (batch,) = iter_rankings(queries, database, exclude)
    np.testing.assert_array_equal(batch.positions, expected)
    dropped = exclude >= 0
    assert (batch.positions[dropped, -1] == exclude[dropped]).all() and (batch.scores[dropped, -1] == -np.inf).all()
    assert np.isfinite(batch.scores[~dropped]).all()


def test_stable_top_k_equals_the_head_of_the_full_ranking_with_ties():
    database, queries = _tied(50, 3, 4), _tied(30, 3, 5)
    expected, _ = _reference(queries, database)
    for k in (1, 4, 7, 49, 50, 80):
        ((_, scores),) = similarity_batches(queries, database)
        positions, values = stable_top_k(scores, k)
        np.testing.assert_array_equal(positions, expected[:, :k])
        np.testing.assert_array_equal(values, np.take_along_axis(scores, expected[:, :k], axis=1))


def test_float16_and_memory_mapped_databases_are_searched_block_by_block(tmp_path):
    queries, database = _random_unit(9, 16, 6), _random_unit(70, 16, 7)
    half = database.astype(np.float16)
    mapped = np.lib.format.open_memmap(tmp_path / "d.npy", mode="w+", dtype=np.float16, shape=half.shape)
    mapped[:] = half
    mapped.flush()
    mapped = np.load(tmp_path / "d.npy", mmap_mode="r")
    exclude = np.arange(9) - 1
    expected = [s for _, s in similarity_batches(queries, half.astype(np.float32), exclude, 1 << 20)]
    for entries in (16 * 5, 70 * 2):  # database blocks of 5 rows / query batches of 2
        got = np.concatenate([s for _, s in similarity_batches(queries, mapped, exclude, entries)])
        np.testing.assert_allclose(got, np.concatenate(expected), rtol=0, atol=1e-6)


def _options(search, **overrides):
    return SimpleNamespace(**{"search": search, "shortlist": 30, "ivf_lists": None, "pq_m": None, "nprobe": None,
                              "hnsw_m": 16, "ef_search": None, **overrides})


@pytest.mark.parametrize("search", ["ivfpq", "hnsw"])
def test_approximate_short_lists_find_the_exact_neighbours(search):
    database = _clustered(1200, 32, 12, seed=8)
    queries = database[:40]
    exclude = np.arange(40)
    exact, _ = _reference(queries, database, exclude)
    parameters = approximate_parameters(_options(search, shortlist=100), *database.shape)
    index = build_approximate_index(database, parameters)
    (batch,) = approximate_rankings(index, queries, database, 100, exclude)
    assert batch.positions.shape == (40, 100) and np.isfinite(batch.scores).all()
    assert not (batch.positions == exclude[:, None]).any()
    recall = np.mean([np.intersect1d(a[:10], e[:10]).size / 10 for a, e in zip(batch.positions, exact, strict=True)])
    assert recall >= 0.95
    # the list is re-scored exactly: its scores are the true inner products, in descending order
    np.testing.assert_allclose(batch.scores, np.einsum("qd,qkd->qk", queries, database[batch.positions]), atol=1e-5)
    assert (np.diff(batch.scores, axis=1) <= 0).all()


@pytest.mark.parametrize("search", ["ivfpq", "hnsw"])
def test_a_short_list_covering_the_database_is_the_exact_ranking(search):
    database = _clustered(300, 16, 6, seed=9)
    queries, exclude = database[:25], np.where(np.arange(25) % 2 == 0, np.arange(25), -1)
    options = _options(search, shortlist=300, ivf_lists=4, nprobe=4)
    index = build_approximate_index(database, approximate_parameters(options, *database.shape))
    (batch,) = approximate_rankings(index, queries, database, 300, exclude)
    (exact,) = iter_rankings(queries, database, exclude)
    np.testing.assert_array_equal(batch.positions, exact.positions)
    np.testing.assert_allclose(batch.scores, exact.scores, atol=1e-6)


def test_approximate_defaults_follow_the_database_size_and_bad_values_fail():
    ivfpq = approximate_parameters(_options("ivfpq", shortlist=1000), 1_000_000, 512)
    assert ivfpq == {"method": "ivfpq", "shortlist": 1000, "ivf_lists": 4000, "pq_m": 64, "pq_bits": 8,
                     "nprobe": 62}
    tiny = approximate_parameters(_options("ivfpq"), 12, 1280)
    assert tiny["ivf_lists"] == 1 and tiny["nprobe"] == 1 and tiny["pq_m"] == 160 and tiny["shortlist"] == 12
    assert approximate_parameters(_options("hnsw", shortlist=100), 5000, 8)["ef_search"] == 200
    with pytest.raises(ConfigError, match="pq_m=7 must divide"):
        approximate_parameters(_options("ivfpq", pq_m=7), 1000, 64)
    with pytest.raises(ConfigError, match="ivf_lists=50 exceeds"):
        approximate_parameters(_options("ivfpq", ivf_lists=50), 20, 64)


@pytest.mark.parametrize(("node", "message"), [
    ({"search": "faiss"}, "evaluation.search"),
    ({"search": "ivfpq", "shortlist": 50}, "evaluation.shortlist"),  # below top_k (100)
    ({"search": "hnsw", "shortlist": 100, "ks": [1, 200]}, "evaluation.shortlist"),
    ({"nprobe": 0}, "evaluation.nprobe"),
    ({"ivf_lists": -4}, "evaluation.ivf_lists"),
    ({"hnsw_m": 1}, "evaluation.hnsw_m"),
    ({"pq_m": "eight"}, "evaluation.pq_m"),
])
def test_search_options_are_checked_at_start_up(node, message):
    from omegaconf import OmegaConf

    from hetretrieval.config import EvaluationOptions, typed

    with pytest.raises(ConfigError, match=message):
        typed(OmegaConf.create(node), EvaluationOptions, "evaluation")
    assert typed(OmegaConf.create({"shortlist": 50}), EvaluationOptions, "evaluation").search == "exact"


def test_consecutive_rows_are_selected_as_a_view():
    descriptors = _random_unit(10, 4, 10)
    view, copy = select_rows(descriptors, np.arange(3, 8)), select_rows(descriptors, np.array([1, 4, 5]))
    assert np.shares_memory(view, descriptors) and not np.shares_memory(copy, descriptors)
    np.testing.assert_array_equal(view, descriptors[3:8])
    np.testing.assert_array_equal(copy, descriptors[[1, 4, 5]])
    assert select_rows(descriptors, np.arange(0)).shape == (0, 4)


class _FakeGpuFaiss:
    """faiss as faiss-gpu with `gpus` GPUs: moving an index wraps it, or raises like an unsupported index."""

    def __init__(self, gpus, fails=False):
        self.gpus, self.fails = gpus, fails

    def get_num_gpus(self):
        return self.gpus

    def index_cpu_to_all_gpus(self, index):
        if self.fails:
            raise RuntimeError("Error in index_cpu_to_gpu: not implemented for this type of index\nmore")
        return ("on gpus", index)


@pytest.mark.parametrize("gpus, fails, k, gpu, expected", [
    (0, False, 100, "auto", "cpu"),
    (1, False, 100, "auto", "gpu"),
    (1, False, 100, "false", "cpu"),
    (1, False, GPU_MAX_K, "true", "gpu"),
    (1, False, GPU_MAX_K + 1, "auto", "cpu"),  # beyond the GPU's k-selection: searched on the CPU
    (1, True, 100, "auto", "cpu"),  # an index the GPU kernels cannot hold
])
def test_on_gpus_moves_only_what_the_gpu_can_search(monkeypatch, caplog, gpus, fails, k, gpu, expected):
    import sys

    monkeypatch.setitem(sys.modules, "faiss", _FakeGpuFaiss(gpus, fails))
    index, device = on_gpus("index", k, gpu)
    assert device == expected
    assert index == (("on gpus", "index") if expected == "gpu" else "index")
    assert ("stays on the CPU" in caplog.text) == (gpus > 0 and gpu != "false" and expected == "cpu")


def test_on_gpus_refuses_a_required_gpu_that_is_absent(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "faiss", _FakeGpuFaiss(0))
    with pytest.raises(ConfigError, match="faiss.gpu=true but faiss sees no GPU"):
        on_gpus("index", 10, "true")
