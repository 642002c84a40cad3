import pytest
import torch

from hetretrieval.errors import ConfigError
from hetretrieval.models.whitening import (
    Whitening,
    apply_whitening,
    fit_learned_whitening,
    fit_pca,
    fit_pca_whitening,
)


def _covariance(x):
    centred = x - x.mean(dim=0)
    return centred.T @ centred / len(x)


@pytest.fixture
def correlated():
    """Descriptors (N, D) with strongly unequal, correlated variances."""
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(6, 6, generator=generator, dtype=torch.float64) * torch.tensor([5, 3, 2, 1, 0.5, 0.1])
    return torch.randn(300, 6, generator=generator, dtype=torch.float64) @ mixing.T + 4.0


@pytest.fixture
def matching_pairs(correlated):
    """Each descriptor paired with a noisy copy of itself (appended), noise larger along some axes."""
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(300, 6, generator=generator, dtype=torch.float64) * torch.tensor([0.1, 1, 0.3, 2, 0.5, 1])
    descriptors = torch.cat([correlated, correlated + noise])
    pairs = torch.stack([torch.arange(300), torch.arange(300, 600)], dim=1)
    return descriptors, pairs


def test_pca_hand_computed():
    points = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # covariance diag(2, 0.5)
    mean, projection = fit_pca_whitening(points)
    assert torch.allclose(mean, torch.zeros(2))
    assert torch.allclose(projection, torch.tensor([[2**-0.5, 0.0], [0.0, 2**0.5]]))


@pytest.mark.parametrize("dim", [None, 3])
def test_pca_whitened_data_has_identity_covariance(correlated, dim):
    mean, projection = fit_pca_whitening(correlated, dim)
    expected_dim = dim or 6
    assert mean.shape == (6,) and projection.shape == (expected_dim, 6)
    whitened = (correlated - mean) @ projection.T
    assert torch.allclose(whitened.mean(dim=0), torch.zeros(expected_dim, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(_covariance(whitened), torch.eye(expected_dim, dtype=torch.float64), atol=1e-10)


def test_pca_keeps_the_most_varying_directions(correlated):
    _, full = fit_pca_whitening(correlated)
    _, truncated = fit_pca_whitening(correlated, dim=2)
    assert torch.allclose(truncated, full[:2])
    variances = torch.linalg.eigvalsh(_covariance(correlated)).flip(0)
    assert torch.allclose(1 / full.norm(dim=1) ** 2, variances)  # rows: eigenvectors / sqrt(eigenvalue)


@pytest.mark.parametrize("shrinkage", [0.3, 1.0])
def test_pca_shrinkage_decorrelates_with_damped_scaling(correlated, shrinkage):
    mean, projection = fit_pca_whitening(correlated, shrinkage=shrinkage)
    covariance = _covariance((correlated - mean) @ projection.T)
    variances = torch.linalg.eigvalsh(_covariance(correlated)).flip(0)
    shrunk = (1 - shrinkage) * variances + shrinkage * variances.mean()
    assert torch.allclose(covariance, torch.diag(variances / shrunk), atol=1e-10)


def test_learned_whitening_whitens_pair_differences(matching_pairs):
    descriptors, pairs = matching_pairs
    for dim in (6, 4):
        mean, projection = fit_learned_whitening(descriptors, pairs, dim)
        assert mean.shape == (6,) and projection.shape == (dim, 6)
        differences = (descriptors[pairs[:, 0]] - descriptors[pairs[:, 1]]) @ projection.T
        assert torch.allclose(differences.T @ differences / len(pairs), torch.eye(dim, dtype=torch.float64), atol=1e-10)


def test_learned_whitening_orders_axes_by_variance(matching_pairs):
    descriptors, pairs = matching_pairs
    mean, projection = fit_learned_whitening(descriptors, pairs)
    assert torch.allclose(mean, descriptors.mean(dim=0))  # every descriptor is in exactly one pair
    covariance = _covariance((descriptors - mean) @ projection.T)
    variances = covariance.diagonal()
    assert torch.allclose(covariance, torch.diag(variances), atol=1e-8)
    assert (variances[:-1] >= variances[1:]).all()


def test_learned_whitening_brings_matches_closer_than_pca_whitening(matching_pairs):
    """Lw suppresses the directions along which matches vary, which PCA-whitening cannot know: it whitens the
    match differences (PCA-whitening leaves their covariance far from identity), so matches end up much closer
    relative to non-matches than after PCA-whitening."""
    descriptors, pairs = matching_pairs
    _, learned = fit_learned_whitening(descriptors, pairs)
    _, pca = fit_pca_whitening(descriptors)
    matches = descriptors[pairs[:, 0]] - descriptors[pairs[:, 1]]
    non_matches = descriptors[pairs[:, 0]] - descriptors[pairs[:, 1].roll(1)]
    identity = torch.eye(6, dtype=torch.float64)
    for projection, whitens_matches in ((learned, True), (pca, False)):
        projected = matches @ projection.T
        error = (projected.T @ projected / len(pairs) - identity).abs().max()
        assert (error < 1e-10) if whitens_matches else (error > 0.5)

    def match_ratio(projection):
        return (matches @ projection.T).pow(2).sum(1).mean() / (non_matches @ projection.T).pow(2).sum(1).mean()

    assert match_ratio(learned) < 0.5 * match_ratio(pca)


def test_fits_keep_float32(correlated, matching_pairs):
    mean, projection = fit_pca_whitening(correlated.float(), dim=2)
    assert mean.dtype == projection.dtype == torch.float32
    descriptors, pairs = matching_pairs
    mean, projection = fit_learned_whitening(descriptors.float(), pairs, dim=2)
    assert mean.dtype == projection.dtype == torch.float32


@pytest.mark.parametrize("dim", [0, 7])
def test_dim_beyond_descriptor_size_raises_config_error(correlated, matching_pairs, dim):
    with pytest.raises(ConfigError, match="whitening dim"):
        fit_pca_whitening(correlated, dim)
    with pytest.raises(ConfigError, match="whitening dim"):
        fit_learned_whitening(*matching_pairs, dim)


def test_dim_beyond_data_rank_raises_config_error(correlated):
    few = correlated[:4]  # 4 centred points span 3 dimensions
    assert fit_pca_whitening(few, dim=3)[1].shape == (3, 6)
    with pytest.raises(ConfigError, match=r"\[1, 3\]"):
        fit_pca_whitening(few, dim=4)


def test_too_few_pairs_raise_config_error(matching_pairs):
    descriptors, pairs = matching_pairs
    with pytest.raises(ConfigError, match="span 5"):
        fit_learned_whitening(descriptors, pairs[:5])


def test_bad_shrinkage_raises_config_error(correlated, matching_pairs):
    with pytest.raises(ConfigError, match="shrinkage"):
        fit_pca_whitening(correlated, shrinkage=1.5)
    with pytest.raises(ConfigError, match="shrinkage"):
        fit_learned_whitening(*matching_pairs, shrinkage=-0.1)


def test_learned_whitening_shrinkage_fits_from_too_few_pairs(matching_pairs):
    descriptors, pairs = matching_pairs
    few = pairs[:5]  # differences span 5 of 6 dimensions
    mean, projection = fit_learned_whitening(descriptors, few, dim=4, shrinkage=0.5)
    assert projection.shape == (4, 6) and torch.isfinite(projection).all()
    differences = descriptors[few[:, 0]] - descriptors[few[:, 1]]
    shrunk = 0.5 * differences.T @ differences / 5 + 0.5 * (differences.pow(2).sum() / 5 / 6) * torch.eye(6, dtype=torch.float64)
    full = fit_learned_whitening(descriptors, few, shrinkage=0.5)[1]
    # The full projection whitens the shrunk difference covariance exactly.
    torch.testing.assert_close(full @ shrunk @ full.T, torch.eye(6, dtype=torch.float64))


def test_learned_whitening_full_shrinkage_only_rotates_and_scales(matching_pairs):
    descriptors, pairs = matching_pairs
    _, projection = fit_learned_whitening(descriptors, pairs, shrinkage=1.0)
    gram = projection @ projection.T
    torch.testing.assert_close(gram, gram[0, 0] * torch.eye(6, dtype=torch.float64))


def test_whitening_module_is_l2_normalised_and_saved_with_the_checkpoint(correlated):
    mean, projection = fit_pca_whitening(correlated.float(), dim=3)
    whitening = Whitening(mean, projection)
    assert (whitening.in_features, whitening.out_features) == (6, 3)
    assert list(whitening.parameters()) == []
    output = whitening(correlated.float()[:5])
    assert output.shape == (5, 3)
    assert torch.allclose(output.norm(dim=1), torch.ones(5))
    assert torch.allclose(output, apply_whitening(correlated.float()[:5], mean, projection))

    restored = Whitening(torch.zeros(6), torch.zeros(3, 6))
    restored.load_state_dict(whitening.state_dict())
    assert set(whitening.state_dict()) == {"mean", "projection"}
    assert torch.equal(restored(correlated.float()[:5]), output)


def test_whitening_module_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="projection"):
        Whitening(torch.zeros(5), torch.zeros(3, 6))


def test_fit_pca_against_svd_and_apply():
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(200, 6, generator=generator, dtype=torch.float64) * torch.tensor([5, 4, 3, 2, 1, 0.5])
    data = data @ torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))[0] + 3
    mean, components = fit_pca(data, 3)
    torch.testing.assert_close(mean, data.mean(0))
    reference = torch.linalg.svd(data - data.mean(0), full_matrices=False).Vh[:3]
    torch.testing.assert_close((components * reference).sum(1).abs(), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(components @ components.T, torch.eye(3, dtype=torch.float64))
    projected = apply_whitening(data, mean, components)
    assert projected.shape == (200, 3)
    torch.testing.assert_close(projected.norm(dim=1), torch.ones(200, dtype=torch.float64))
    with pytest.raises(ConfigError):
        fit_pca(data, 7)
