"""Distributed extraction (simulated on CPU with two processes) gives exactly the single-process results."""

import json

import numpy as np
import pytest

from conftest import TINY_BUILTIN
from hetretrieval.cli.evaluate import evaluate


def test_ddp_sim_matches_single_process(compose_eval, tmp_path):
    single = evaluate(compose_eval(*TINY_BUILTIN, "paths.output_dir=" + str(tmp_path / "single")))
    evaluate(compose_eval(*TINY_BUILTIN, "trainer=ddp_sim", "paths.output_dir=" + str(tmp_path / "ddp")))
    distributed = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert distributed["counts"] == single["counts"] and distributed["skipped"] == []
    assert distributed["mAP"] == pytest.approx(single["mAP"], abs=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "ddp" / "descriptors.npy"),
                               np.load(tmp_path / "single" / "descriptors.npy"), atol=1e-5)
