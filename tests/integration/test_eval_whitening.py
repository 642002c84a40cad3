"""`hetretrieval-eval` test-time whitening (`whitening=pca|lw whitening.fit_on=...`) and αQE / DBA end to end."""

import json

import numpy as np
import pytest
import torch

from conftest import TINY_BUILTIN
from hetretrieval.cli.evaluate import evaluate
from hetretrieval.config import compose_option, instantiate
from hetretrieval.errors import ConfigError
from hetretrieval.extraction.batching import ImageSource
from hetretrieval.extraction.engine import ExtractionEngine
from hetretrieval.models.backbones import Backbone
from hetretrieval.models.network import RetrievalNetwork
from hetretrieval.models.pooling.heads import GeM
from hetretrieval.models.whitening import apply_whitening, fit_learned_whitening, fit_pca_whitening
from hetretrieval.training.losses import all_pairs

# the fit set: other photos than the evaluated ones (TINY_BUILTIN: astronaut, coffee, chelsea, rocket)
FIT_PHOTOS = "{photos: [camera, coins, clock, moon], variants_per_class: 3, image_size: 64}"
FIT = ["whitening.fit_on=builtin", f"whitening.fit_options={FIT_PHOTOS}", "whitening.dim=8"]


def _plain_descriptors(cfg, node) -> tuple[np.ndarray, list]:
    """GeM descriptors of `node`'s images by an independent network, and their labels."""
    dataset = instantiate(node)
    engine = ExtractionEngine(RetrievalNetwork(Backbone("tf_efficientnet_lite0"), {"gem": GeM()}), progress=False)
    extraction = engine.extract(dataset.records, ImageSource(cfg.extraction.max_size, cfg.extraction.max_pixels))
    assert extraction.valid.all()
    return extraction.descriptors["gem"], dataset.labels


@pytest.mark.parametrize("kind", ["pca", "lw"])
def test_eval_time_whitening_equals_the_fitted_transform(compose_eval, tmp_path, kind):
    cfg = compose_eval(*TINY_BUILTIN, f"whitening={kind}", *FIT)
    summary = evaluate(cfg)
    saved = np.load(tmp_path / "run" / "descriptors.npy")

    fit_node = compose_option("dataset", "builtin", cfg)
    for key, value in {"photos": ["camera", "coins", "clock", "moon"], "variants_per_class": 3,
                       "image_size": 64}.items():
        fit_node[key] = value
    fit_descriptors, fit_labels = _plain_descriptors(cfg, fit_node)
    evaluated, _ = _plain_descriptors(cfg, cfg.dataset)
    fit = torch.from_numpy(fit_descriptors)
    if kind == "pca":
        mean, projection = fit_pca_whitening(fit, 8, cfg.whitening.shrinkage)
    else:
        names = sorted(set(fit_labels))
        first, second, _, _ = all_pairs(torch.tensor([names.index(label) for label in fit_labels]))
        mean, projection = fit_learned_whitening(fit, torch.stack([first, second], 1), 8, cfg.whitening.shrinkage)
    expected = apply_whitening(torch.from_numpy(evaluated), mean, projection).numpy()
    np.testing.assert_allclose(saved, expected, atol=1e-4)

    assert summary["descriptor"] == "gem+whitening" and summary["dim"] == 8
    assert summary["whitening"] == {"kind": kind, "dim": 8, "shrinkage": cfg.whitening.shrinkage, "fit_on": "builtin",
                                    "fit_option": "builtin", "fit_options": {"photos": ["camera", "coins", "clock",
                                                                                        "moon"],
                                                                             "variants_per_class": 3,
                                                                             "image_size": 64},
                                    "fit_images": len(fit_labels)}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["whitening"]["kind"] == kind

    again = evaluate(compose_eval(*TINY_BUILTIN, f"whitening={kind}", *FIT))  # fit set and whitened: cached
    assert again["descriptor_cache"] == "hit" and again["mAP"] == summary["mAP"]


def test_whitening_option_errors(compose_eval):
    with pytest.raises(ConfigError, match="needs whitening.fit_on"):
        evaluate(compose_eval(*TINY_BUILTIN, "whitening=pca"))
    with pytest.raises(ConfigError, match="shares 12 images with the evaluated queries"):
        evaluate(compose_eval(*TINY_BUILTIN, "whitening=pca", "whitening.fit_on=builtin",
                              "whitening.fit_options={photos: [astronaut, coffee, chelsea, rocket], "
                              "variants_per_class: 2, image_size: 64}"))
    with pytest.raises(ConfigError, match="whitening.fit_options.domain is no option of dataset=builtin"):
        evaluate(compose_eval(*TINY_BUILTIN, "whitening=pca", "whitening.fit_on=builtin",
                              "whitening.fit_options={domain: [photo]}"))
    with pytest.raises(ConfigError, match="unknown dataset option 'nosuch'"):
        evaluate(compose_eval(*TINY_BUILTIN, "whitening=pca", "whitening.fit_on=nosuch"))


def test_query_expansion_and_dba_through_the_cli(compose_eval, tmp_path):
    plain = evaluate(compose_eval(*TINY_BUILTIN))
    plain_descriptors = np.load(tmp_path / "run" / "descriptors.npy")
    expanded = evaluate(compose_eval(*TINY_BUILTIN, "evaluation.query_expansion={k: 2, alpha: 3}",
                                     "evaluation.dba={k: 1, alpha: 3}"))
    np.testing.assert_array_equal(np.load(tmp_path / "run" / "descriptors.npy"), plain_descriptors)
    assert expanded["mAP_before_expansion"] == plain["mAP"]
    assert expanded["query_expansion"] == {"k": 2, "alpha": 3.0} and expanded["dba"] == {"k": 1, "alpha": 3.0}
    assert "mAP_before_expansion" not in plain
    with pytest.raises(ConfigError, match="evaluation.query_expansion.k"):
        evaluate(compose_eval(*TINY_BUILTIN, "evaluation.query_expansion={k: 0, alpha: 3}"))
