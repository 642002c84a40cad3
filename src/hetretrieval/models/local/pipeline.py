"""Local-feature extraction: the DELF-style extractor over one stage of the evaluated backbone.

`DelfExtractor` takes dense features from one stage of the evaluated timm backbone (with the same weights and
input normalisation), scores them by a trained DELF attention (`attention_checkpoint`) or, without one, by the
feature norm, and keeps the best over an image pyramid with receptive-field keypoint locations measured on
that stage for each input size of the pyramid. The extraction engine runs it (or ORB) on every image, beside any global heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from torch import nn

from hetretrieval.errors import ConfigError, DataError
from hetretrieval.models.backbones import Backbone
from hetretrieval.models.checkpoints import read_torch_file
from hetretrieval.models.local.attention import AttentionScorer, FeatureNormScorer
from hetretrieval.models.local.features import LocalFeatures
from hetretrieval.models.local.keypoints import ReceptiveFieldBySize, extract_local_features
from hetretrieval.models.local.orb import OrbExtractor


class StageFeatures(nn.Module):
    """`(B, 3, H, W)` images in [0, 1] -> `(B, C, h, w)` features of one stage of a timm backbone.

    Built with `timm.create_model(..., features_only=True, out_indices=(stage,))` and loaded with the weights
    and input normalisation of `backbone`, so local features come from the very network being evaluated.
    """

    def __init__(self, backbone: Backbone, stage: int) -> None:
        super().__init__()
        try:
            model = timm.create_model(backbone.model_name, pretrained=False, features_only=True, out_indices=(stage,))
        except (IndexError, ValueError, AssertionError) as error:
            raise ConfigError(f"{backbone.model_name} has no feature stage {stage}: {error}") from None
        missing, _ = model.load_state_dict(backbone.model.state_dict(), strict=False)
        if missing:
            raise ConfigError(f"stage {stage} of {backbone.model_name} does not share the backbone's weights "
                              f"({len(missing)} missing, e.g. {missing[:3]})")
        self.model = model
        self.stage = stage
        self.out_channels = int(model.feature_info.channels()[0])
        self.register_buffer("mean", backbone.mean.clone())
        self.register_buffer("std", backbone.std.clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)[0]


def load_attention_scorer(path: str | Path, in_channels: int) -> AttentionScorer:
    """The DELF attention saved by `hetretrieval-train-attention` (`{"hidden_channels", "state_dict", ...}`)."""
    saved = read_torch_file(path, "attention checkpoint")
    if not isinstance(saved, dict) or "state_dict" not in saved or "hidden_channels" not in saved:
        raise DataError(f"'{path}' is not an attention checkpoint written by hetretrieval-train-attention")
    if saved.get("in_channels") != in_channels:
        raise ConfigError(f"attention checkpoint '{path}' scores {saved.get('in_channels')}-channel features "
                          f"(backbone {saved.get('backbone')}, stage {saved.get('stage')}), not {in_channels}")
    scorer = AttentionScorer(in_channels, int(saved["hidden_channels"]))
    scorer.load_state_dict(saved["state_dict"])
    return scorer.eval()


class DelfExtractor(nn.Module):
    """DELF-style local features of one image, `(3, H, W)` in [0, 1] -> `LocalFeatures` (float descriptors).

    `scales` is the image pyramid, `top_n` the keypoints kept per image (score `>= threshold` if set);
    `pca_dim` (applied at search time, learned on the database) reduces the descriptors, e.g. to 40 as DELF.
    """

    name = "delf"

    def __init__(self, backbone: Backbone, stage: int = 3, scales: Sequence[float] = (0.7071, 1.0, 1.4142),
                 top_n: int = 1000, threshold: float | None = None, attention_checkpoint: str | None = None,
                 pca_dim: int | None = None) -> None:
        super().__init__()
        self.features = StageFeatures(backbone, stage).eval()
        self.backbone_name = backbone.model_name
        self.scales = tuple(float(s) for s in scales)
        self.top_n, self.threshold, self.pca_dim = top_n, threshold, pca_dim
        if pca_dim is not None and not 1 <= pca_dim <= self.features.out_channels:
            raise ConfigError(f"pca_dim={pca_dim} must be between 1 and the stage's {self.features.out_channels} "
                              "channels (or null)")
        self.scorer = (FeatureNormScorer() if attention_checkpoint is None
                       else load_attention_scorer(attention_checkpoint, self.features.out_channels))
        # the field of each input size: its offset depends on the size modulo the stride (TF-"same" padding)
        self.receptive_field_at = ReceptiveFieldBySize(self.features)

    @property
    def scorer_name(self) -> str:
        return self.scorer.name

    def forward(self, image: torch.Tensor) -> LocalFeatures:
        return extract_local_features(self.features, image, self.scorer, self.receptive_field_at, self.scales,
                                      self.top_n, self.threshold)


LOCAL_EXTRACTORS = (DelfExtractor, OrbExtractor)
