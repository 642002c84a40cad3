"""DELF scorers and the attention-training classifier head."""

from __future__ import annotations

import math

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


def test_attention_scorer_values_by_hand():
    """1x1 conv, ReLU, 1x1 conv, softplus(z) = log(1 + e^z), on two positions with hand-set weights."""
    scorer = AttentionScorer(2, hidden_channels=2)
    with torch.no_grad():
        scorer.layers[0].weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 2.0]])[:, :, None, None])
        scorer.layers[0].bias.copy_(torch.tensor([0.0, -1.0]))
        scorer.layers[2].weight.copy_(torch.tensor([[1.0, -2.0]])[:, :, None, None])
        scorer.layers[2].bias.copy_(torch.tensor([0.5]))
    features = torch.tensor([[1.0, 3.0], [2.0, 0.0]])[None, :, None, :]  # positions (1, 2) and (3, 0)
    # (1, 2): hidden relu(-1, 3.5) = (0, 3.5), logit 0 - 7 + 0.5 = -6.5
    # (3, 0): hidden relu(3, 0.5) = (3, 0.5), logit 3 - 1 + 0.5 = 2.5
    expected = torch.tensor([[[math.log1p(math.exp(-6.5)), math.log1p(math.exp(2.5))]]])
    torch.testing.assert_close(scorer(features), expected, rtol=1e-6, atol=0)


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
