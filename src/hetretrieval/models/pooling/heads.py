"""Thin `nn.Module`s over `functional.py`: each maps a feature map `(B, C, H, W)` to an L2-normalised `(B, C)`."""

from __future__ import annotations

import torch
from torch import nn

from hetretrieval.errors import ConfigError
from hetretrieval.models.pooling import functional as PF


class GlobalPooling(nn.Module):
    """Base of the global heads: `name` is the descriptor's name in outputs and tables."""

    name = "pooling"


class MAC(GlobalPooling):
    name = "mac"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return PF.l2n(PF.mac(x))


class SPoC(GlobalPooling):
    name = "spoc"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return PF.l2n(PF.spoc(x))


class GeM(GlobalPooling):
    """Generalised-mean pooling with a learnable exponent `p` (initialised at 3, as Radenović et al.)."""

    name = "gem"

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learn_p: bool = True) -> None:
        super().__init__()
        if p <= 0 or eps <= 0:
            raise ConfigError(f"GeM needs p > 0 and eps > 0, got p={p}, eps={eps}")
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learn_p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return PF.l2n(PF.gem(x, self.p, self.eps))

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, eps={self.eps}"


class RMAC(GlobalPooling):
    """Regional MAC over the Tolias et al. grid (`levels` scales, ~`overlap` between neighbours)."""

    name = "rmac"

    def __init__(self, levels: int = 3, overlap: float = 0.4) -> None:
        super().__init__()
        if levels < 1 or not 0.0 <= overlap < 1.0:
            raise ConfigError(f"R-MAC needs levels >= 1 and 0 <= overlap < 1, got {levels}, {overlap}")
        self.levels = levels
        self.overlap = overlap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return PF.rmac(x, self.levels, self.overlap)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, overlap={self.overlap}"


class ClassToken(GlobalPooling):
    """`cls`: a transformer's final class token `(B, C)`, L2-normalised (DINOv2 / CLIP's global descriptor).

    It reads the class token, not the map: `RetrievalNetwork` hands it `Backbone.features_and_class_token`'s
    token (`reads`), and refuses a backbone without one (CNNs, SigLIP) at construction.
    """

    name = "cls"
    reads = "class_token"

    def forward(self, class_token: torch.Tensor) -> torch.Tensor:
        if class_token.ndim != 2:
            raise ConfigError(f"pooling=cls reads a backbone's class token (B, C), got a {class_token.ndim}-d "
                              "tensor: describe through RetrievalNetwork")
        return PF.l2n(class_token)
