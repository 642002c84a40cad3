"""NetVLAD, DELF-style and ORB descriptors and re-ranking through `hetretrieval-eval`, on tiny and real data."""

import json

import numpy as np
import skimage.data
import torch

from conftest import TINY_BUILTIN
from hetretrieval.cli.evaluate import evaluate
from hetretrieval.cli.train_attention import train_attention
from hetretrieval.index.local import verify_pairs
from hetretrieval.models.backbones import Backbone
from hetretrieval.models.local.features import load_local_features
from hetretrieval.models.local.pipeline import DelfExtractor
from hetretrieval.models.local.ransac import GeometricVerifier

TINY_LOCAL = [*TINY_BUILTIN, "evaluation.report=false", "dataset.image_size=128", "extraction.max_size=128",
              "local_search.shortlist=5", "verification.iterations=200"]


def test_orb_runs_and_writes_the_run_files(compose_eval, tmp_path):
    summary = evaluate(compose_eval(*TINY_LOCAL, "pooling=orb", "pooling.n_features=300"))
    run = tmp_path / "run"
    saved = json.loads((run / "summary.json").read_text())
    assert saved["descriptor"] == "orb" and saved["mAP"] == summary["mAP"] and 0 < summary["mAP"] <= 1
    assert saved["scorer"] is None and saved["local_index"]["index"] == "IndexBinaryFlat"
    assert saved["local_index"]["code_bytes"] == 32  # 256 bits, searched exactly
    assert len(load_local_features(run / "local_features.npz")) == 12
    assert (run / "per_class_map.csv").is_file() and (run / "per_query_ap.csv").is_file()


def test_netvlad_initialises_from_the_database_and_whitens(compose_eval, tmp_path):
    summary = evaluate(compose_eval(*TINY_BUILTIN, "evaluation.report=false", "pooling=netvlad",
                                    "pooling.n_clusters=8", "pooling.samples_per_image=4",
                                    "pooling.whitening_dim=4096"))
    # 12 database images span 11 directions: whitening is capped there
    assert summary["descriptor"] == "netvlad+pcaw11" and summary["dim"] == 11
    descriptors = np.load(tmp_path / "run" / "descriptors.npy")
    np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1.0, rtol=1e-5)
    # whitened to identity covariance in their 11-dimensional span, the 12 database vectors form a regular
    # simplex: every pair at cosine -1/11 (so every ranking is a tie up to round-off, and mAP means nothing here)
    gram = descriptors @ descriptors.T
    np.testing.assert_allclose(gram[~np.eye(12, dtype=bool)], -1 / 11, atol=1e-3)


def test_reranking_keeps_the_ranking_beyond_top_k(compose_eval, tmp_path):
    cfg = compose_eval(*TINY_LOCAL, "rerank=orb", "rerank.top_k=3", "rerank.local.n_features=300")
    reranked = evaluate(cfg)
    assert reranked["descriptor"] == "gem+rerank_orb" and reranked["rerank_top_k"] == 3
    neighbours = np.load(tmp_path / "run" / "neighbours.npy")
    plain = evaluate(compose_eval(*TINY_LOCAL))
    global_neighbours = np.load(tmp_path / "run" / "neighbours.npy")
    np.testing.assert_array_equal(neighbours[:, 3:], global_neighbours[:, 3:])
    np.testing.assert_array_equal(np.sort(neighbours[:, :3]), np.sort(global_neighbours[:, :3]))
    assert plain["descriptor"] == "gem"


def test_delf_features_verify_a_stereo_pair_far_above_unrelated_pairs():
    extractor = DelfExtractor(Backbone("tf_efficientnet_lite0"), scales=(0.7071, 1.0), top_n=500)
    left, right, _ = skimage.data.stereo_motorcycle()

    def features(image):
        return extractor(torch.from_numpy(image).permute(2, 0, 1).float() / 255)

    stereo, unrelated = features(left), [features(getattr(skimage.data, n)()) for n in ("astronaut", "coffee")]
    inliers = verify_pairs([(stereo, features(right)), *((stereo, u) for u in unrelated)],
                           GeometricVerifier(threshold=8.0, iterations=500))
    assert extractor.scorer_name == "feature_norm"
    assert inliers[0] >= 40 and inliers[0] >= 4 * inliers[1:].max(), inliers


def test_delf_with_a_trained_attention_runs_on_a_pq_index(compose_eval, cache_dir, tmp_path):
    from hydra import compose, initialize_config_dir

    from hetretrieval.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        training = compose("attention_train", overrides=[
            f"paths.output_dir={tmp_path / 'attention'}", f"paths.cache_dir={cache_dir}", *TINY_BUILTIN[:4],
            "training.image_size=64", "training.batch_size=6", "trainer.max_epochs=1"])
    checkpoint = train_attention(training)
    summary = evaluate(compose_eval(*TINY_LOCAL, "pooling=delf", "pooling.scales=[1.0]",
                                    f"pooling.attention_checkpoint={checkpoint}"))
    assert summary["descriptor"] == "delf" and summary["scorer"] == "attention" and 0 < summary["mAP"] <= 1
    memory = summary["local_index"]
    assert memory["index"] == "IndexPQ" and memory["code_bytes"] <= 8 and summary["local_dim"] == 40
    assert memory["index_bytes"] < memory["flat_bytes"]  # 40 float32 = 160 bytes per descriptor, coded in <= 8
    assert len(load_local_features(tmp_path / "run" / "local_features.npz")) == 12
