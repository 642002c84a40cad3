"""NetVLAD: aggregation against a per-pixel/per-cluster loop, normalisations, initialisation and its cache."""

from __future__ import annotations

import math

import pytest
import torch

from hetretrieval.errors import ConfigError
from hetretrieval.models.pooling.netvlad import (
    NetVLAD,
    assignment_from_centroids,
    netvlad,
    sample_local_features,
)


def netvlad_loop(x, centroids, weight, bias):
    """Brute force: per image, pixel and cluster, the soft-assigned residual; then both normalisations."""
    batch, channels, height, width = x.shape
    out = []
    for b in range(batch):
        vlad = torch.zeros(len(centroids), channels, dtype=x.dtype)
        for i in range(height):
            for j in range(width):
                pixel = x[b, :, i, j]
                logits = torch.stack([weight[k] @ pixel + bias[k] for k in range(len(centroids))])
                weights = torch.exp(logits) / torch.exp(logits).sum()
                for k in range(len(centroids)):
                    vlad[k] += weights[k] * (pixel - centroids[k])
        vlad = torch.stack([v / v.norm() for v in vlad]).flatten()
        out.append(vlad / vlad.norm())
    return torch.stack(out)


@pytest.mark.parametrize("channels", [1, 3, 7])
def test_netvlad_matches_loop(channels):
    generator = torch.Generator().manual_seed(channels)
    x = torch.randn(2, channels, 3, 4, generator=generator, dtype=torch.float64)
    centroids = torch.randn(5, channels, generator=generator, dtype=torch.float64)
    weight = torch.randn(5, channels, generator=generator, dtype=torch.float64)
    bias = torch.randn(5, generator=generator, dtype=torch.float64)
    result = netvlad(x, centroids, weight, bias)
    assert result.shape == (2, 5 * channels)
    torch.testing.assert_close(result, netvlad_loop(x, centroids, weight, bias))


def test_netvlad_intra_and_global_normalisation():
    x = torch.randn(3, 6, 5, 5, dtype=torch.float64)
    result = netvlad(
        x,
        torch.randn(4, 6, dtype=torch.float64),
        torch.randn(4, 6, dtype=torch.float64),
        torch.zeros(4, dtype=torch.float64),
    )
    torch.testing.assert_close(result.norm(dim=1), torch.ones(3, dtype=torch.float64))
    per_cluster = result.view(3, 4, 6).norm(dim=2)  # intra-normalised blocks, each 1 / sqrt(K) after L2
    torch.testing.assert_close(per_cluster, torch.full((3, 4), 0.5, dtype=torch.float64))


@pytest.mark.parametrize(("in_channels", "dim"), [(5, None), (16, 8), (33, 33)])
def test_module_any_channel_count(in_channels, dim):
    head = NetVLAD(in_channels, n_clusters=4, dim=dim)
    out = head(torch.randn(2, in_channels, 6, 5))
    assert out.shape == (2, head.out_dim) == (2, 4 * (dim or in_channels))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def test_dim_larger_than_channels_is_a_config_error():
    with pytest.raises(ConfigError, match="dim=512"):
        NetVLAD(320)


def test_assignment_is_nearest_centroid_with_the_paper_ratio():
    generator = torch.Generator().manual_seed(0)
    centroids = torch.randn(6, 8, generator=generator, dtype=torch.float64)
    descriptors = centroids.repeat(50, 1) + 0.3 * torch.randn(
        300, 8, generator=generator, dtype=torch.float64
    )
    weight, bias = assignment_from_centroids(descriptors, centroids, ratio=100.0)
    soft = (descriptors @ weight.T + bias).softmax(dim=1)
    nearest = torch.cdist(descriptors, centroids).argmin(dim=1)
    assert torch.equal(soft.argmax(dim=1), nearest)
    top_two = soft.topk(2, dim=1).values
    # alpha is set so that the mean log-ratio of the two largest weights is exactly log(100)
    assert (top_two[:, 0] / top_two[:, 1]).log().mean().item() == pytest.approx(math.log(100.0))
    hard = assignment_from_centroids(descriptors, centroids, ratio=1e12)
    assert ((descriptors @ hard[0].T + hard[1]).softmax(dim=1).max(dim=1).values > 0.99).float().mean() > 0.95


def clustered_features(channels=12, n_clusters=4, per_cluster=60, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = 4 * torch.eye(n_clusters, channels)  # well-separated directions, as after L2 normalisation
    return centres.repeat(per_cluster, 1) + 0.5 * torch.randn(
        n_clusters * per_cluster, channels, generator=generator
    )


def test_init_from_features_assigns_to_nearest_centroid_and_is_seeded():
    features = clustered_features()
    head_a, head_b = NetVLAD(12, n_clusters=4, dim=6), NetVLAD(12, n_clusters=4, dim=6)
    head_a.init_from_features(features, seed=3)
    head_b.init_from_features(features, seed=3)
    for a, b in zip(head_a.state_dict().values(), head_b.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    descriptors = head_a.local_descriptors(features[:, :, None, None]).flatten(1)
    assert descriptors.shape == (len(features), 6)
    logits = head_a.assignment(descriptors[:, :, None, None]).flatten(1)
    distances = torch.cdist(descriptors, head_a.centroids)
    assert torch.equal(logits.argmax(dim=1), distances.argmin(dim=1))
    assert distances.min(dim=0).values.max() < 0.5  # every centroid sits in the descriptor cloud


def test_cache_round_trip(tmp_path):
    cache = tmp_path / "init" / "netvlad.pt"
    first = NetVLAD(12, n_clusters=4, dim=None, cache_path=cache)
    first.init_from_features(clustered_features(), seed=1)
    assert cache.is_file()

    def must_not_extract():
        raise AssertionError("features extracted although the cache exists")

    second = NetVLAD(12, n_clusters=4, dim=None, cache_path=cache)
    second.init_from_features(must_not_extract, seed=1)
    x = torch.randn(2, 12, 4, 4)
    torch.testing.assert_close(first(x), second(x))
    with pytest.raises(ConfigError, match="was built for"):
        NetVLAD(12, n_clusters=5, dim=None, cache_path=cache).init_from_features(must_not_extract, seed=1)


def test_sample_local_features_sizes_and_seed():
    maps = [torch.randn(3, 4, 5), torch.randn(3, 2, 2)]
    sample = sample_local_features(maps, n_per_image=6, seed=0)
    assert sample.shape == (6 + 4, 3)
    torch.testing.assert_close(sample, sample_local_features(maps, n_per_image=6, seed=0))
    all_first = {tuple(v.tolist()) for v in maps[0].flatten(1).T}
    assert all(tuple(v.tolist()) in all_first for v in sample[:6])
    assert len({tuple(v.tolist()) for v in sample[:6]}) == 6  # distinct positions
