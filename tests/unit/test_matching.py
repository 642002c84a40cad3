"""Descriptor matching against brute-force loops; Hamming distance against a numpy bit count.

Binary (ORB) matching is also checked on real heritage-wild ORB features (skipped without ../shared/data).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hetretrieval.data.images import load_image
from hetretrieval.errors import ConfigError
from hetretrieval.models.local.features import LocalFeatures
from hetretrieval.models.local.matching import (
    descriptor_distance,
    hamming_distance,
    match_binary,
    match_descriptors,
    match_features,
    match_features_to_many,
)
from hetretrieval.models.local.orb import extract_orb


def unit_descriptors(n: int, dim: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(
        torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1
    )


def binary_descriptors(n: int, num_bytes: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, num_bytes), dtype=np.uint8))


def brute_force_matches(distance: np.ndarray, mutual: bool, ratio: float | None) -> list[tuple[int, int]]:
    """Loop reference: first minimum on ties, like `match_descriptors`."""
    matches = []
    for i, row in enumerate(distance):
        j = int(np.argmin(row))
        if mutual and int(np.argmin(distance[:, j])) != i:
            continue
        if ratio is not None and len(row) > 1 and not row[j] < ratio * np.sort(row)[1]:
            continue
        matches.append((i, j))
    return matches


def popcount_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Brute-force Hamming distances of packed descriptors: XOR, unpack, count."""
    return np.unpackbits(a[:, None] ^ b[None], axis=-1).sum(-1)


def test_hamming_distance_matches_numpy_bit_count():
    a, b = binary_descriptors(7, 32, 0), binary_descriptors(5, 32, 1)
    expected = np.unpackbits(a.numpy()[:, None] ^ b.numpy()[None], axis=-1).sum(-1)
    np.testing.assert_array_equal(hamming_distance(a, b).numpy(), expected)


def test_hamming_distance_hand_computed():
    a = torch.tensor([[0b00000000, 0b11111111], [0b10101010, 0b00000001]], dtype=torch.uint8)
    b = torch.tensor([[0b00000000, 0b00000000], [0b01010101, 0b00000001]], dtype=torch.uint8)
    np.testing.assert_array_equal(hamming_distance(a, b).numpy(), [[8, 11], [5, 8]])


def test_float_distance_is_euclidean_on_unit_vectors():
    a, b = unit_descriptors(6, 16, 0), unit_descriptors(4, 16, 1)
    torch.testing.assert_close(descriptor_distance(a, b), torch.cdist(a, b), atol=1e-5, rtol=0)


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize(("mutual", "ratio"), [(True, None), (False, 0.9), (True, 0.9), (False, None)])
def test_match_descriptors_equals_brute_force(binary, mutual, ratio):
    if binary:  # 1-byte descriptors: many distance ties, which exercise the tie rule
        a, b = binary_descriptors(40, 1, 2), binary_descriptors(30, 1, 3)
        distance = np.unpackbits(a.numpy()[:, None] ^ b.numpy()[None], axis=-1).sum(-1).astype(float)
    else:
        a, b = unit_descriptors(40, 8, 2), unit_descriptors(30, 8, 3)
        distance = torch.cdist(a.double(), b.double()).numpy()
    matches = match_descriptors(a, b, mutual=mutual, ratio=ratio)
    expected = brute_force_matches(distance, mutual, ratio)
    assert matches.dtype == torch.int64 and matches.shape == (len(expected), 2)
    assert [tuple(pair) for pair in matches.tolist()] == expected


def test_mutual_nearest_neighbours_recover_a_permutation():
    b = unit_descriptors(50, 32, 4)
    permutation = torch.randperm(50, generator=torch.Generator().manual_seed(5))
    a = torch.nn.functional.normalize(b[permutation] + 0.01 * unit_descriptors(50, 32, 6), dim=1)
    matches = match_descriptors(a, b, mutual=True, ratio=0.8)
    torch.testing.assert_close(matches, torch.stack([torch.arange(50), permutation], dim=1))


def test_edge_cases():
    empty = torch.zeros((0, 32), dtype=torch.uint8)
    assert match_descriptors(empty, binary_descriptors(3, 32, 0)).shape == (0, 2)
    one = binary_descriptors(1, 32, 0)
    # a single candidate has no second neighbour: the ratio test cannot reject it
    assert match_descriptors(binary_descriptors(4, 32, 1), one, mutual=False, ratio=0.5).shape == (4, 2)
    with pytest.raises(ConfigError):
        match_descriptors(one, one, ratio=1.5)
    with pytest.raises(ValueError):
        match_descriptors(one, unit_descriptors(1, 32, 0))
    with pytest.raises(ValueError, match="packed descriptors differ"):
        match_binary(one.numpy(), [binary_descriptors(3, 16, 0).numpy()])
    matches = match_binary(binary_descriptors(4, 32, 1).numpy(), [empty.numpy(), one.numpy()])
    assert [m.shape for m in matches] == [(0, 2), (1, 2)]  # 4 proposals of one descriptor: one is mutual


@pytest.mark.parametrize(("mutual", "ratio"), [(True, None), (False, 0.9), (True, 0.9), (False, None)])
def test_binary_matching_to_many_equals_brute_force_with_ties(mutual, ratio):
    """2-byte descriptors: most distances tie, so the lowest-index rule decides most matches."""
    a = binary_descriptors(300, 2, 8).numpy()
    others = [binary_descriptors(n, 2, 9 + n).numpy() for n in (1, 40, 700, 0, 250)]
    for other, matches in zip(others, match_binary(a, others, mutual, ratio), strict=True):
        expected = brute_force_matches(popcount_distance(a, other).astype(float), mutual, ratio) if len(other) else []
        assert matches.dtype == np.int64 and [tuple(pair) for pair in matches.tolist()] == expected


@pytest.fixture(scope="module")
def heritage_orb(heritage_root) -> list[LocalFeatures]:
    """ORB 1000 at 512 px on ten heritage-wild images: four Notre-Dame views first, then six others."""
    names = sorted(p.name for p in heritage_root.iterdir() if p.suffix.lower() in {".jpg", ".jpeg"})
    notre_dame = [n for n in names if "notre" in n.lower()][:4]
    others = [n for n in names if n not in notre_dame][:6]
    return [extract_orb(load_image(heritage_root / name, max_size=512)) for name in notre_dame + others]


@pytest.mark.parametrize(("mutual", "ratio"), [(True, None), (True, 0.9), (False, 0.8)])
def test_orb_matching_on_heritage_images_equals_brute_force_popcount(heritage_orb, mutual, ratio):
    query, database = heritage_orb[0], heritage_orb[1:]
    assert all(len(f) > 500 for f in heritage_orb)
    to_many = match_features_to_many(query, database, mutual, ratio)
    for other, many in zip(database, to_many, strict=True):
        distance = popcount_distance(query.descriptors, other.descriptors).astype(float)
        expected = brute_force_matches(distance, mutual, ratio)
        assert [tuple(pair) for pair in many.tolist()] == expected
        np.testing.assert_array_equal(match_features(query, other, mutual, ratio), many)


def test_match_features_returns_numpy_pairs():
    descriptors = binary_descriptors(5, 32, 7).numpy()
    features = LocalFeatures(
        keypoints=np.zeros((5, 2), np.float32),
        descriptors=descriptors,
        scores=np.ones(5, np.float32),
        image_size=(8, 8),
    )
    matches = match_features(features, features)
    assert isinstance(matches, np.ndarray)
    np.testing.assert_array_equal(matches, np.stack([np.arange(5), np.arange(5)], axis=1))
