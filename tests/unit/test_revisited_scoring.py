"""Every ranking of a revisited dataset gets the Easy/Medium/Hard scores: local search (pooling=orb) and
re-ranking (rerank=), on a tiny fake Revisited Oxford with hand-computed expectations."""

import pickle

import numpy as np
import pytest
import torch

from hetretrieval.config import EvaluationOptions
from hetretrieval.data.images import save_image
from hetretrieval.data.revisitop import revisitop_dataset
from hetretrieval.evaluation.scoring import LocalScoring, score_global, score_local
from hetretrieval.index.local import LocalSearchOptions
from hetretrieval.models.local.features import LocalFeatures
from hetretrieval.models.local.ransac import GeometricVerifier

# database a, b, c, d = imlist positions 0..3
GND = [{"bbx": [0.0, 0.0, 8.0, 8.0], "easy": np.array([1]), "hard": np.array([0]), "junk": np.array([2])},
       {"bbx": [0.0, 0.0, 8.0, 8.0], "easy": np.array([3]), "hard": np.array([2]), "junk": np.array([], int)}]
# words each image shares with q1 (ids 0..59) and q2 (ids 100..159): inlier counts b 30 > d 20 > a 15 > c 0
# for q1 (ranking b, d, a, c) and c 25 > a 10 > d 8 > b 0 for q2 (ranking c, a, d, b)
WORDS = {
    "q1": range(0, 60), "q2": range(100, 160),
    "a": [*range(50, 60), *range(0, 5), *range(125, 135)], "b": range(0, 30),
    "c": range(100, 125), "d": [*range(30, 50), *range(135, 143)],
}
# Hand-computed official scores of those rankings (trapezoidal AP, junk removed first):
# q1 easy: b first -> 1; medium (b, a; junk c): b at 0, a at 2 -> (1 + (1/2 + 2/3) / 2) / 2 = 19/24;
#    hard (a; junk b, c): d, a -> a at 1 -> (0 + 1/2) / 2 = 1/4
# q2 easy (d; junk c): a, d, b -> d at 1 -> 1/4; medium (d, c): c at 0, d at 2 -> 19/24; hard (c; junk d) -> 1
EXPECTED = {"mAP_easy": (1 + 0.25) / 2, "mAP_medium": 19 / 24, "mAP_hard": (0.25 + 1) / 2,
            "mP@1_easy": 0.5, "mP@1_medium": 1.0, "mP@1_hard": 0.5}


@pytest.fixture
def dataset(tmp_path):
    (tmp_path / "gnd_roxford5k.pkl").write_bytes(
        pickle.dumps({"imlist": ["a", "b", "c", "d"], "qimlist": ["q1", "q2"], "gnd": GND}))
    (tmp_path / "jpg").mkdir()
    for name in ("a", "b", "c", "d", "q1", "q2"):
        save_image(torch.rand(3, 16, 16), tmp_path / "jpg" / f"{name}.jpg")
    return revisitop_dataset(tmp_path, "roxford5k")


def _features() -> list[LocalFeatures]:
    """ORB-like packed-binary features in record order (q1, q2, a, b, c, d): each word one random 32-byte
    descriptor at one random place, every database image a translated view of its words."""
    rng = np.random.default_rng(0)
    vocabulary = rng.integers(0, 256, (200, 32), dtype=np.uint8)
    places = rng.uniform(20, 180, (200, 2)).astype(np.float32)
    features = []
    for i, name in enumerate(("q1", "q2", "a", "b", "c", "d")):
        words = np.array(list(WORDS[name]))
        features.append(LocalFeatures(places[words] + np.float32(7 * i), vocabulary[words],
                                      np.ones(len(words), np.float32), (200, 200)))
    return features


def _scoring(rerank_top_k=None) -> LocalScoring:
    return LocalScoring(GeometricVerifier(threshold=2.0, iterations=200), LocalSearchOptions(), rerank_top_k)


def test_local_search_rankings_get_the_revisited_scores(dataset):
    scored = score_local(_features(), np.ones(6, bool), dataset, EvaluationOptions(ks=[1]), _scoring())
    assert scored.results.neighbours.tolist() == [[3, 5, 2, 4], [4, 2, 5, 3]]  # records: b d a c / c a d b
    assert scored.revisited == pytest.approx(EXPECTED, abs=1e-6)


def test_reranked_global_rankings_get_the_revisited_scores_of_the_reranked_order(dataset):
    # global descriptors rank q1: c, d, a, b and q2: b, d, a, c (the reverse of what the local features say)
    descriptors = np.zeros((6, 4), np.float32)
    descriptors[0], descriptors[1] = [1, 0, 0, 0], [0, 1, 0, 0]
    descriptors[2:] = [[0.6, 0.6, 0.5, 0], [0.1, 0.9, 0.4, 0], [0.95, 0.1, 0.3, 0], [0.8, 0.7, 0.2, 0]]
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    options = EvaluationOptions(ks=[1])
    plain = score_global(descriptors, np.ones(6, bool), dataset, options)
    assert plain.results.neighbours.tolist() == [[4, 5, 2, 3], [3, 5, 2, 4]]
    assert plain.revisited["mAP_easy"] < EXPECTED["mAP_easy"]  # the global order is scored too, and worse
    reranked = score_global(descriptors, np.ones(6, bool), dataset, options, rerank=(_features(), _scoring(4)))
    assert reranked.results.neighbours.tolist() == [[3, 5, 2, 4], [4, 2, 5, 3]]
    assert reranked.revisited == pytest.approx(EXPECTED, abs=1e-6)
