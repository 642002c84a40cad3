"""`evaluation.search=ivfpq|hnsw` end to end on the tiny built-in benchmark: the run states its search and AP
convention; a short-list covering the database reproduces the exact brute-force mAP, a shorter one the
brute-force AP over the truncated ranking."""

import csv

import numpy as np
import pytest

from brute_force_map import brute_force_map
from conftest import TINY_BUILTIN
from hetretrieval.cli.evaluate import evaluate


@pytest.mark.parametrize("search", ["ivfpq", "hnsw"])
def test_a_short_list_covering_the_database_gives_the_exact_map(compose_eval, tmp_path, search):
    summary = evaluate(compose_eval(*TINY_BUILTIN, f"evaluation.search={search}"))
    assert summary["search"]["method"] == search and summary["search"]["shortlist"] == 12
    assert "not retrieved" in summary["search"]["ap_convention"]
    assert summary["mAP"] == pytest.approx(brute_force_map(tmp_path / "run"), abs=1e-6)


def test_a_short_list_shorter_than_the_database_scores_ap_over_it(compose_eval, tmp_path):
    summary = evaluate(compose_eval(*TINY_BUILTIN, "evaluation.search=hnsw", "evaluation.shortlist=1",
                                    "evaluation.top_k=1", "evaluation.ks=[1]"))
    run = tmp_path / "run"
    descriptors = np.load(run / "descriptors.npy").astype(np.float64)
    with (run / "images.csv").open() as handle:
        labels = [row["label"] for row in csv.DictReader(handle)]
    expected = []
    for q in range(len(labels)):  # every image is a query and in the database; HNSW over 12 vectors is exact
        others = np.array([i for i in range(len(labels)) if i != q])
        relevant = np.array([labels[i] == labels[q] for i in others])
        top = np.argsort(-(descriptors[others] @ descriptors[q]), kind="stable")[:1]
        expected.append(relevant[top[0]] / relevant.sum())  # a hit at rank 1, of the class's 2 positives
    assert summary["mAP"] == pytest.approx(np.mean(expected), abs=1e-6)
    assert summary["mAP"] < brute_force_map(run)
    assert summary["search"] == {"method": "hnsw", "shortlist": 1, "hnsw_m": 32, "ef_search": 2, "device": "cpu",
                                 "ap_convention": summary["search"]["ap_convention"]}
