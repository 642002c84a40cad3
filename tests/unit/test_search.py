"""Streaming faiss rankings against a dense numpy reference."""

import numpy as np

from hetretrieval.index.search import iter_rankings
from hetretrieval.models.pooling.functional import l2n


def _random_unit(n, d, seed):
    import torch
    return l2n(torch.randn(n, d, generator=torch.Generator().manual_seed(seed))).numpy()


def test_full_rankings_match_dense_argsort_in_any_batch_size():
    queries, database = _random_unit(13, 8, 0), _random_unit(40, 8, 1)
    expected = np.argsort(-(queries @ database.T), axis=1, kind="stable")
    for entries in (40, 3 * 40, 1 << 20):
        batches = list(iter_rankings(queries, database, max_batch_entries=entries))
        positions = np.concatenate([b.positions for b in batches])
        np.testing.assert_array_equal(positions, expected)
        assert all(np.all(np.diff(b.scores, axis=1) <= 1e-6) for b in batches)


def test_excluded_item_goes_last_with_minus_inf():
    database = _random_unit(10, 4, 2)
    queries = database[[3, 7]]
    exclude = np.array([3, -1])
    (batch,) = iter_rankings(queries, database, exclude=exclude)
    assert batch.positions[0, -1] == 3 and batch.scores[0, -1] == -np.inf
    assert 3 not in batch.positions[0, :-1]
    assert batch.positions[1, 0] == 7 and np.isfinite(batch.scores[1]).all()
