"""OpenCV's RANSAC on one pair, the reference the batched torch RANSAC is tested and benchmarked against.

It is also a backend of `GeometricVerifier` (`backend=opencv`, the `auto` choice for affine models on CPU),
so it lives in `hetretrieval.models.local.ransac`; tests and benchmarks import it from here.
"""

from hetretrieval.models.local.ransac import ransac_opencv

__all__ = ["ransac_opencv"]
