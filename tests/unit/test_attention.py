"""DELF scorers and the attention-training classifier head."""

from __future__ import annotations

import torch

from hetretrieval.models.local.attention import (
    AttentionClassifier,
    AttentionScorer,
    FeatureNormScorer,
    attention_pool,
)


def test_attention_scorer_shape_and_positivity():
    scorer = AttentionScorer(16, hidden_channels=8)
    with torch.no_grad():
        scorer.layers[2].bias.fill_(-50.0)  # softplus stays > 0 even for very negative logits
    scores = scorer(torch.randn(2, 16, 5, 7))
    assert scores.shape == (2, 5, 7)
    assert (scores > 0).all()
    assert scorer.name == "attention"


def test_feature_norm_scorer_is_the_channel_norm():
    features = torch.randn(3, 10, 4, 6)
    scorer = FeatureNormScorer()
    torch.testing.assert_close(scorer(features), torch.linalg.norm(features, dim=1))
    assert scorer.name == "feature_norm"


def test_attention_pool_against_loop():
    features, scores = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.rand(2, 4, 5, dtype=torch.float64)
    expected = torch.zeros(2, 3, dtype=torch.float64)
    for b in range(2):
        for i in range(4):
            for j in range(5):
                expected[b] += scores[b, i, j] * features[b, :, i, j] / features[b, :, i, j].norm() / 20
    torch.testing.assert_close(attention_pool(features, scores), expected)


def test_classifier_logits_and_gradients_reach_the_attention():
    head = AttentionClassifier(in_channels=16, n_classes=7, hidden_channels=8)
    logits = head(torch.randn(4, 16, 6, 6))
    assert logits.shape == (4, 7)
    logits.sum().backward()
    assert head.attention.layers[0].weight.grad.abs().sum() > 0
