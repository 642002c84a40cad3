"""ORB + mutual-NN/ratio matching + RANSAC on real photographs bundled with scikit-image (no network).

The Middlebury motorcycle stereo pair shares one scene; astronaut, coffee, chelsea and rocket are unrelated.
Measured with this configuration (ORB 1000, mutual NN + ratio 0.9, affine, 5 px, 1000 iterations, confidence
0.999): the stereo pair keeps 221 inliers (batched) / 219 (OpenCV backend + refit) / 214 (OpenCV alone), the
motorcycle's unrelated pairs 5-7.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import skimage.data

from hetretrieval.analysis.figures import draw_matches
from hetretrieval.models.local.features import LocalFeatures
from hetretrieval.models.local.matching import match_features
from hetretrieval.models.local.orb import extract_orb
from hetretrieval.models.local.ransac import GeometricVerifier
from opencv_reference import ransac_opencv

RATIO = 0.9
THRESHOLD = 5.0
ITERATIONS = 1000


@pytest.fixture(scope="module")
def images() -> dict[str, np.ndarray]:
    left, right, _ = skimage.data.stereo_motorcycle()
    photos = {name: getattr(skimage.data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")}
    return {"motorcycle_left": left, "motorcycle_right": right, **photos}


@pytest.fixture(scope="module")
def features(images) -> dict[str, LocalFeatures]:
    return {name: extract_orb(image, n_features=1000) for name, image in images.items()}


def correspondences(features, name_a, name_b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    matches = match_features(features[name_a], features[name_b], mutual=True, ratio=RATIO)
    return features[name_a].keypoints[matches[:, 0]], features[name_b].keypoints[matches[:, 1]], matches


def test_stereo_pair_has_far_more_inliers_than_unrelated_pairs(features):
    pairs = [("motorcycle_left", "motorcycle_right")] + [
        ("motorcycle_left", other) for other in ("astronaut", "coffee", "chelsea", "rocket")
    ]
    verify = GeometricVerifier(model="affine", threshold=THRESHOLD, iterations=ITERATIONS)
    stereo, *unrelated = (
        mask.sum() for mask in verify([correspondences(features, *pair)[:2] for pair in pairs])
    )
    assert stereo >= 150
    assert all(stereo >= 10 * max(count, 1) for count in unrelated), (stereo, unrelated)


@pytest.mark.parametrize("backend", ["batched", "opencv"])
@pytest.mark.parametrize("model", ["affine", "homography"])
def test_verifier_and_opencv_inlier_counts_agree_on_real_pairs(features, model, backend):
    """All 15 pairs of the six photographs: within 5 inliers or 10%, whichever is larger.

    Both stop early at 99.9% confidence; the verifier then refits the model on its inliers (OpenCV alone does
    not), and the batched path draws other samples, so counts differ by a few, never more.
    """
    pairs = [correspondences(features, *pair)[:2] for pair in itertools.combinations(features, 2)]
    masks = GeometricVerifier(model=model, threshold=THRESHOLD, iterations=ITERATIONS, backend=backend)(pairs)
    for (src, dst), mask in zip(pairs, masks, strict=True):
        reference, _ = ransac_opencv(src, dst, model, threshold=THRESHOLD, iterations=ITERATIONS)
        batched, opencv = int(mask.sum()), int(reference.sum())
        assert abs(batched - opencv) <= max(5, 0.1 * max(batched, opencv)), (len(src), batched, opencv)


def test_orb_on_tensor_and_array_inputs_agree(images):
    import torch

    image = images["chelsea"]
    from_array = extract_orb(image, n_features=300)
    from_tensor = extract_orb(torch.from_numpy(image).permute(2, 0, 1).float() / 255, n_features=300)
    assert len(from_array) == 300 and from_array.image_size == image.shape[:2]
    np.testing.assert_array_equal(from_array.descriptors, from_tensor.descriptors)
    np.testing.assert_allclose(from_array.keypoints, from_tensor.keypoints)


def test_draw_matches_writes_a_png_of_both_images(images, features, tmp_path):
    from PIL import Image

    src, dst, matches = correspondences(features, "motorcycle_left", "motorcycle_right")
    inliers, _ = ransac_opencv(src, dst, "affine", threshold=THRESHOLD, iterations=ITERATIONS)
    left, right = images["motorcycle_left"], images["motorcycle_right"]
    path = draw_matches(
        left,
        right,
        features["motorcycle_left"].keypoints,
        features["motorcycle_right"].keypoints,
        matches,
        inliers,
        tmp_path / "figures" / "stereo.png",
    )
    with Image.open(path) as figure:
        assert figure.size == (left.shape[1] + right.shape[1], left.shape[0])
        pixels = np.asarray(figure.convert("RGB")).astype(int)
    green = (pixels[..., 1] > 120) & (pixels[..., 0] < 80) & (pixels[..., 2] < 100)
    assert green.sum() > 1000  # inlier lines are drawn
