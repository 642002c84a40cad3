"""DELF keypoint scoring (Noh et al., ICCV 2017): a learned attention, or the feature norm without one.

A scorer maps `(B, C, H, W)` features to `(B, H, W)` non-negative scores and has a `name` saying which
scorer produced the keypoints. `AttentionClassifier` is the head of DELF's attention-training stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def feature_norm_scores(features: torch.Tensor) -> torch.Tensor:
    """`(B, C, H, W) -> (B, H, W)`: the L2 norm of each local feature (strong activations = salient)."""
    return torch.linalg.vector_norm(features, dim=1)


def attention_pool(features: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Attention-weighted pooling, `(B, C, H, W)` features and `(B, H, W)` scores -> `(B, C)`.

    The features are L2-normalised along channels and their score-weighted sum (Noh et al., eq. 2) is divided
    by `H * W` as in the authors' released code, so the logit scale does not depend on the image size.
    """
    return torch.einsum("bchw,bhw->bc", F.normalize(features, dim=1), scores) / scores[0].numel()


class FeatureNormScorer(nn.Module):
    """Scores each local feature by its L2 norm: no weights, the fallback without a trained attention."""

    name = "feature_norm"

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return feature_norm_scores(features)


class AttentionScorer(nn.Module):
    """DELF attention, `(B, C, H, W) -> (B, H, W)`: 1x1 conv, ReLU, 1x1 conv to one channel, softplus."""

    name = "attention"

    def __init__(self, in_channels: int, hidden_channels: int = 512) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, 1, kernel_size=1),
            nn.Softplus(),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features).squeeze(1)


class AttentionClassifier(nn.Module):
    """Head of DELF's attention training, `(B, C, H, W)` frozen-backbone features -> `(B, n_classes)` logits.

    Image-level labels train `attention` through `attention_pool` followed by a linear classifier; the trained
    `attention` then scores keypoints.
    """

    def __init__(self, in_channels: int, n_classes: int, hidden_channels: int = 512) -> None:
        super().__init__()
        self.attention = AttentionScorer(in_channels, hidden_channels)
        self.classifier = nn.Linear(in_channels, n_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(attention_pool(features, self.attention(features)))
