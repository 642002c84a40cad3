"""The controlled variation study on hand-made images with a tiny stand-in backbone (no weights needed)."""

import numpy as np
import pytest
import torch
from torch import nn

from hetretrieval.data.datasets import ImageRecord, make_dataset
from hetretrieval.data.images import save_image
from hetretrieval.errors import ConfigError, DataError
from hetretrieval.evaluation.study import (
    PRESETS,
    StudyPlan,
    describe_varied,
    hold_out_queries,
    variation_study,
    write_study,
)
from hetretrieval.extraction.batching import ImageSource
from hetretrieval.extraction.engine import ExtractionEngine
from hetretrieval.models.network import RetrievalNetwork
from hetretrieval.models.pooling.heads import MAC, SPoC


class CountingBackbone(nn.Module):
    """Identity feature map (B, 3, H, W) that counts the images it sees."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, images):
        self.seen += images.shape[0]
        return images


@pytest.fixture
def dataset(tmp_path):
    colours = {"red": (1.0, 0.1, 0.1), "green": (0.1, 1.0, 0.1), "blue": (0.1, 0.1, 1.0)}
    records = []
    for label, colour in colours.items():
        for i in range(3):
            image = torch.tensor(colour).view(3, 1, 1).expand(3, 16, 16) * (0.7 + 0.1 * i)
            path = tmp_path / f"{label}{i}.png"
            save_image(image, path)
            records.append(ImageRecord(path, label, {}))
    return make_dataset("colours", records)


def test_plan_validation_and_preset():
    assert StudyPlan("blur", (1.0, 0.0, 0.5)).strengths == (0.0, 0.5, 1.0)
    assert PRESETS["grayscale"].apply_to == "all"
    with pytest.raises(ConfigError):
        StudyPlan("blurr")
    with pytest.raises(ConfigError):
        StudyPlan("blur", (1.5,))
    with pytest.raises(ConfigError):
        StudyPlan("blur", apply_to="database")


def test_hold_out_queries_spreads_and_removes_them(dataset):
    held = hold_out_queries(dataset, 2)
    assert held.query_ids.tolist() == [0, 2, 3, 5, 6, 8]
    assert held.database_ids.tolist() == [1, 4, 7]
    with pytest.raises(DataError, match="empties the database"):
        hold_out_queries(dataset, None)


def test_one_clean_forward_per_image_and_one_per_varied_strength(dataset):
    backbone = CountingBackbone()
    varied = np.zeros(len(dataset), dtype=bool)
    varied[[0, 3]] = True
    plans = [(StudyPlan("grayscale", (0.0, 1.0)), varied), (StudyPlan("occlusion", (0.0, 0.5, 1.0)), varied)]
    engine = ExtractionEngine(RetrievalNetwork(backbone, {"mac": MAC(), "spoc": SPoC()}), batch_size=16)
    keys, extraction = describe_varied(engine, dataset, ImageSource(max_size=None), plans)
    assert extraction.valid.all() and backbone.seen == 9 + 2 * (1 + 2)
    clean, gray = ({head: extraction.descriptors[key] for head, key in keys[condition].items()}
                   for condition in [("grayscale", "queries", 0.0), ("grayscale", "queries", 1.0)])
    assert np.array_equal(np.delete(gray["mac"], [0, 3], axis=0), np.delete(clean["mac"], [0, 3], axis=0))
    # a grayscale image has equal channels: its L2-normalised SPoC descriptor is (1, 1, 1) / sqrt(3)
    assert gray["spoc"][0] == pytest.approx(np.full(3, 3 ** -0.5), abs=1e-5)


def test_grayscale_kills_colour_only_retrieval(dataset, tmp_path):
    engine = ExtractionEngine(RetrievalNetwork(CountingBackbone(), {"spoc": SPoC()}), batch_size=32)
    rows = variation_study(dataset, engine, [StudyPlan("grayscale", (0.0, 1.0)), PRESETS["grayscale"]],
                           ImageSource(max_size=16), queries_per_class=1)
    by_condition = {(r["apply_to"], r["strength"]): r for r in rows}
    assert by_condition[("queries", 0.0)]["mAP"] == 1.0 and by_condition[("all", 0.0)]["mAP"] == 1.0
    assert by_condition[("queries", 1.0)]["n_database"] == 6 and by_condition[("all", 1.0)]["n_database"] == 9
    assert by_condition[("all", 1.0)]["mAP"] < 0.6  # all images grey and differing only in brightness
    paths = write_study(rows, tmp_path / "out")
    assert paths["csv"].read_text().count("\n") == 5 and paths["plot"].stat().st_size > 1000
