"""NetVLAD (Arandjelović et al., CVPR 2016): soft-assignment VLAD of a conv map's local descriptors.

Off-the-shelf use needs no training: `NetVLAD.init_from_features` sets the centroids by k-means on sampled
local descriptors and the assignment so that it approximates hard VLAD assignment, as in the paper.
`NetVLAD.prepare` does it from a dataset's images (through the extraction engine) before extraction (and optionally fits a PCA-whitening of
the VLAD vectors on the database), which is how `hetretrieval-eval pooling=netvlad` builds it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hetretrieval.data.datasets import RetrievalDataset
from hetretrieval.data.sampling import image_subset
from hetretrieval.errors import ConfigError, DataError
from hetretrieval.models.whitening import Whitening, fit_pca, fit_pca_whitening_in_span

ASSIGNMENT_RATIO = (
    100.0  # mean ratio of the two largest soft-assignment weights at init (Arandjelović et al.)
)


def netvlad(
    x: torch.Tensor, centroids: torch.Tensor, assignment_weight: torch.Tensor, assignment_bias: torch.Tensor
) -> torch.Tensor:
    """NetVLAD aggregation, `(B, C, H, W)` local descriptors -> `(B, K * C)` L2-normalised.

    Soft assignment `a_k(x_i) = softmax_k(w_k . x_i + b_k)` (a 1x1 conv, `(K, C)` weight, `(K,)` bias),
    residual sums `V_k = sum_i a_k(x_i) (x_i - c_k)` over the `H * W` positions with `(K, C)` centroids,
    then each `V_k` L2-normalised (intra-normalisation) and the flattened `(K * C)` vector L2-normalised.
    """
    descriptors = x.flatten(2)  # (B, C, N)
    logits = torch.einsum("kc,bcn->bkn", assignment_weight, descriptors) + assignment_bias[:, None]
    assignment = logits.softmax(dim=1)  # (B, K, N)
    residuals = assignment @ descriptors.transpose(1, 2) - assignment.sum(2, keepdim=True) * centroids
    return F.normalize(F.normalize(residuals, dim=2).flatten(1), dim=1)


def assignment_from_centroids(
    descriptors: torch.Tensor, centroids: torch.Tensor, ratio: float = ASSIGNMENT_RATIO
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft assignment approximating nearest-centroid assignment: `(N, C)`, `(K, C)` -> `(K, C)`, `(K,)`.

    `softmax_k(-alpha ||x - c_k||^2)` equals `softmax_k(w_k . x + b_k)` with `w_k = 2 alpha c_k` and
    `b_k = -alpha ||c_k||^2`; `alpha` makes the largest weight `ratio` times the second largest on average
    over the descriptors (in log space): `alpha = log(ratio) / mean(d_2^2 - d_1^2)`, `d_1 <= d_2` the
    distances to the two nearest centroids.
    """
    if len(centroids) < 2:
        raise ConfigError(f"NetVLAD needs at least 2 clusters, got {len(centroids)}")
    squared_distances = torch.cdist(descriptors.double(), centroids.double()).square()
    nearest_two = squared_distances.topk(2, dim=1, largest=False).values
    alpha = math.log(ratio) / (nearest_two[:, 1] - nearest_two[:, 0]).mean().item()
    return 2 * alpha * centroids, -alpha * centroids.square().sum(1)


def kmeans_centroids(descriptors: torch.Tensor, n_clusters: int, seed: int) -> torch.Tensor:
    """Faiss k-means (seeded, hence reproducible), `(N, C)` -> `(K, C)` centroids."""
    import faiss

    if len(descriptors) < n_clusters:
        raise ConfigError(
            f"k-means with {n_clusters} clusters needs at least as many descriptors, got {len(descriptors)}"
        )
    data = descriptors.detach().float().cpu().contiguous().numpy()
    kmeans = faiss.Kmeans(data.shape[1], n_clusters, seed=seed)
    kmeans.train(data)
    return torch.from_numpy(kmeans.centroids).to(descriptors)


def sample_local_features(feature_maps: Iterable[torch.Tensor], n_per_image: int, seed: int) -> torch.Tensor:
    """Draw local descriptors from conv maps: `(C, h, w)` maps (or a `(B, C, H, W)` batch) -> `(N, C)`.

    Each map gives `min(n_per_image, h * w)` distinct positions drawn uniformly with a generator seeded by
    `seed`, so the sample (and a k-means on it) is reproducible; maps may differ in size.
    """
    if n_per_image < 1:
        raise ConfigError(f"n_per_image must be >= 1, got {n_per_image}")
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for feature_map in feature_maps:
        descriptors = feature_map.flatten(1).T  # (h * w, C)
        positions = torch.randperm(len(descriptors), generator=generator)[:n_per_image]
        samples.append(descriptors[positions.to(descriptors.device)])
    if not samples:
        raise ConfigError("no feature maps to sample local features from")
    return torch.cat(samples)


@dataclass(frozen=True)
class NetVLADPreparation:
    """Which images initialise NetVLAD before extraction, and the optional whitening learned on the database."""

    image_set: str = "database"  # images sampled for k-means: database, queries or all
    max_images: int | None = 1000  # at most this many of them (seeded draw)
    samples_per_image: int = 100  # local descriptors drawn per image
    seed: int = 0
    whitening_dim: int | None = None  # PCA-whitening of the VLAD vectors to this dimension (e.g. 4096, capped
    # by the database's rank); None: no whitening
    whitening_shrinkage: float = 0.0


class NetVLAD(nn.Module):
    """NetVLAD head, `(B, in_channels, H, W) -> (B, out_dim)` L2-normalised, `out_dim = n_clusters * dim`.

    Optionally reduces the channels to `dim` with a 1x1 conv (`dim=None` keeps `in_channels`), then
    L2-normalises each local descriptor along channels (as Arandjelović et al.) before `netvlad`.
    `cache_path` (a `.pt` file) stores the initialisation computed by `init_from_features`, so a later run
    with the same configuration reuses it without extracting features again.
    """

    def __init__(
        self,
        in_channels: int,
        n_clusters: int = 64,
        dim: int | None = 512,
        cache_path: str | Path | None = None,
    ) -> None:
        super().__init__()
        if n_clusters < 2:
            raise ConfigError(f"NetVLAD needs n_clusters >= 2, got {n_clusters}")
        if dim is not None and not 1 <= dim <= in_channels:
            raise ConfigError(
                f"NetVLAD dim={dim} must be between 1 and the backbone's {in_channels} channels "
                "(or None for no reduction)"
            )
        self.in_channels, self.n_clusters, self.dim = in_channels, n_clusters, dim
        self.cache_path = None if cache_path is None else Path(cache_path)
        channels = in_channels if dim is None else dim
        self.reduction = None if dim is None else nn.Conv2d(in_channels, dim, kernel_size=1)
        self.centroids = nn.Parameter(F.normalize(torch.randn(n_clusters, channels), dim=1))
        self.assignment = nn.Conv2d(channels, n_clusters, kernel_size=1)
        self.preparation = NetVLADPreparation()
        self.cache_dir: Path | None = None
        self.backbone_name: str | None = None
        self.whitening: Whitening | None = None

    @classmethod
    def for_backbone(cls, backbone: nn.Module, n_clusters: int = 64, dim: int | None = 512,
                     cache_dir: str | Path | None = None, **preparation) -> NetVLAD:
        """NetVLAD over `backbone.out_channels` channels, reduced to `dim` only if the backbone has more.

        `preparation` holds the `NetVLADPreparation` fields used by `prepare`; `prepare` caches its k-means
        initialisation in `cache_dir` under a name that identifies the backbone and the sampled images.
        """
        head = cls(backbone.out_channels, n_clusters, dim if dim is not None and dim < backbone.out_channels else None)
        head.backbone_name = getattr(backbone, "model_name", type(backbone).__name__)
        head.preparation = NetVLADPreparation(**preparation)
        head.cache_dir = None if cache_dir is None else Path(cache_dir)
        return head

    @property
    def name(self) -> str:
        return "netvlad" if self.whitening is None else f"netvlad+pcaw{self.whitening.out_features}"

    @property
    def out_dim(self) -> int:
        """Descriptor dimension `n_clusters * dim` (what a following whitening module takes)."""
        return self.n_clusters * self.centroids.shape[1]

    def local_descriptors(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, in_channels, H, W) -> (B, dim, H, W)`: optional reduction, then channel-wise L2 norm."""
        if self.reduction is not None:
            x = self.reduction(x)
        return F.normalize(x, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vlad = netvlad(
            self.local_descriptors(x), self.centroids, self.assignment.weight.flatten(1), self.assignment.bias
        )
        return vlad if self.whitening is None else self.whitening(vlad)

    @torch.no_grad()
    def prepare(self, feature_maps: Callable[[np.ndarray], Iterable[torch.Tensor]], dataset: RetrievalDataset,
                max_size: int | None) -> None:
        """Fit on `dataset` before extraction, as `preparation` says: the k-means initialisation from local
        features (or the cache), then the database whitening. `feature_maps(ids)` yields the backbone's
        `(C, h, w)` map of each readable record of `ids` read at `max_size` (the extraction engine's)."""
        options = self.preparation
        sampled = image_subset(dataset, options.image_set, options.max_images, options.seed)
        if self.cache_dir is not None:
            key = repr((self.backbone_name, max_size, options.samples_per_image,
                        [str(dataset.records[i].path) for i in sampled]))
            digest = hashlib.sha1(key.encode()).hexdigest()[:16]
            self.cache_path = self.cache_dir / f"netvlad-k{self.n_clusters}-d{self.dim}-{digest}.pt"
        self.init_from_features(
            lambda: sample_local_features(feature_maps(sampled), options.samples_per_image, options.seed),
            options.seed)
        self.whitening = None
        if options.whitening_dim is not None:
            vlad = torch.cat([self(feature_map[None]) for feature_map in feature_maps(image_subset(dataset))])
            self.whitening = Whitening(*fit_pca_whitening_in_span(vlad, options.whitening_dim,
                                                                 options.whitening_shrinkage))

    @torch.no_grad()
    def init_from_features(
        self, local_features: torch.Tensor | Callable[[], torch.Tensor], seed: int
    ) -> None:
        """Initialise from `(N, in_channels)` backbone local descriptors (e.g. `sample_local_features`).

        The reduction (if any) becomes the PCA projection of the descriptors to `dim`, the centroids a faiss
        k-means of the reduced, normalised descriptors, and the assignment `assignment_from_centroids`.
        `local_features` may be a zero-argument callable, called only when `cache_path` holds no
        initialisation yet; a computed initialisation is saved there.
        """
        if self.cache_path is not None and self.cache_path.is_file():
            self._load_initialisation(seed)
            return
        features = local_features() if callable(local_features) else local_features
        if features.ndim != 2 or features.shape[1] != self.in_channels:
            raise ValueError(f"local features must be (N, {self.in_channels}), got {tuple(features.shape)}")
        features = features.to(self.centroids)
        if self.reduction is not None:
            mean, components = fit_pca(features, self.reduction.out_channels)
            self.reduction.weight.copy_(components[:, :, None, None])
            self.reduction.bias.copy_(-components @ mean)
        descriptors = self.local_descriptors(features[:, :, None, None]).flatten(1)
        centroids = kmeans_centroids(descriptors, self.n_clusters, seed)
        weight, bias = assignment_from_centroids(descriptors, centroids)
        self.centroids.copy_(centroids)
        self.assignment.weight.copy_(weight[:, :, None, None])
        self.assignment.bias.copy_(bias)
        if self.cache_path is not None:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"config": self._cache_config(seed), "state_dict": self.state_dict()}, self.cache_path)

    def _cache_config(self, seed: int) -> dict[str, int | None]:
        return {"in_channels": self.in_channels, "n_clusters": self.n_clusters, "dim": self.dim, "seed": seed}

    def _load_initialisation(self, seed: int) -> None:
        from hetretrieval.models.checkpoints import read_torch_file  # here: checkpoints builds NetVLADs

        saved = read_torch_file(self.cache_path, "NetVLAD initialisation cache")
        try:
            config, state_dict = saved["config"], saved["state_dict"]
        except (KeyError, TypeError) as error:
            raise DataError(f"malformed NetVLAD initialisation cache {self.cache_path}: {error}") from error
        if config != self._cache_config(seed):
            raise ConfigError(
                f"NetVLAD initialisation cache {self.cache_path} was built for {config}, not "
                f"{self._cache_config(seed)}: delete it or set another cache_path"
            )
        self.load_state_dict(state_dict)
