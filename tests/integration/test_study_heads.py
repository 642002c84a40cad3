"""`hetretrieval-analyze task=study` takes its heads from the pooling group (NetVLAD, DELF included) and its
extraction settings from `extraction.*`."""

import csv

import pytest
from hydra import compose, initialize_config_dir

from hetretrieval.cli.analyze import study
from hetretrieval.config import CONFIG_DIR
from hetretrieval.errors import ConfigError


def _config(tmp_path, cache_dir, *overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("analyze", overrides=[
            "task=study", "dataset=builtin", "dataset.photos=[astronaut,coffee,chelsea,rocket]",
            "dataset.variants_per_class=2", "dataset.image_size=128", f"dataset.cache_dir={cache_dir}",
            f"paths.cache_dir={tmp_path / 'cache'}", "extraction.max_size=128", "study.variations=[grayscale]",
            "study.strengths=[0.0,1.0]", "study.queries_per_class=1", *overrides])


def test_study_describes_netvlad_and_delf_heads(tmp_path, cache_dir):
    paths = study(_config(tmp_path, cache_dir, "heads=[gem,netvlad,delf]", "local_search.pq_subquantizers=4"),
                  tmp_path / "out")
    with paths["csv"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["descriptor"], float(r["strength"])) for r in rows} == {
        (head, strength) for head in ("gem", "netvlad", "delf") for strength in (0.0, 1.0)}
    for row in rows:
        assert int(row["n_queries"]) == 4 and int(row["n_database"]) == 8
        assert 0.0 < float(row["mAP"]) <= 1.0
    assert (tmp_path / "cache" / "netvlad").is_dir()  # NetVLAD's k-means ran on the study's images


def test_study_rejects_an_unknown_head(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match="unknown pooling option 'gemm'"):
        study(_config(tmp_path, cache_dir, "heads=[gemm]"), tmp_path / "out")
