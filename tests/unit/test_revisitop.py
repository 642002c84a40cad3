"""Revisitop helpers that need no real data: layout, query crops, download failure, malformed pickles."""

import pickle
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from hetretrieval.data.revisitop import crop_to_bbx, download_revisitop, image_path, load_revisitop
from hetretrieval.errors import ConfigError, DataError


def test_image_path_follows_official_layout():
    assert image_path("/data/roxford5k", "all_souls_000013") == Path("/data/roxford5k/jpg/all_souls_000013.jpg")


def test_crop_rounds_and_clips_to_the_image():
    image = Image.new("RGB", (100, 80))
    assert crop_to_bbx(image, (10.4, 20.6, 50.5, 60.2)).size == (40, 39)  # (10, 21) to (50, 60)
    assert crop_to_bbx(image, (-5.0, -3.0, 140.0, 95.0)).size == (100, 80)
    with pytest.raises(ConfigError, match="does not overlap"):
        crop_to_bbx(image, (120.0, 10.0, 150.0, 40.0))


def test_download_failure_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as error:
        download_revisitop("roxford5k", tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert "http://cmp.felk.cvut.cz/revisitop/data/datasets/roxford5k/gnd_roxford5k.pkl" in message
    assert str(tmp_path / "gnd_roxford5k.pkl") in message


def test_download_keeps_an_existing_file(tmp_path, monkeypatch):
    (tmp_path / "gnd_rparis6k.pkl").write_bytes(b"x")
    monkeypatch.setattr(urllib.request, "urlopen", None)
    assert download_revisitop("rparis6k", tmp_path) == tmp_path / "gnd_rparis6k.pkl"


def test_unknown_dataset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown revisitop dataset"):
        load_revisitop(tmp_path, "oxford5k")
    with pytest.raises(DataError, match="not found"):
        load_revisitop(tmp_path, "roxford5k")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([1, 2], "expected a dict"),
        ({"imlist": ["a"], "qimlist": ["q"], "gnd": []}, "one entry per query"),
        ({"imlist": "ab", "qimlist": [], "gnd": []}, "list of image names"),
        ({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"bbx": [0, 0, 1, 1], "easy": [], "hard": []}]}, "keys"),
        ({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"bbx": [0, 1], "easy": [], "hard": [], "junk": []}]},
         "'bbx'"),
        ({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"bbx": [0, 0, 1, 1], "easy": [1], "hard": [], "junk": []}]},
         r"'easy' must be a list of database indices in \[0, 1\)"),
    ],
)
def test_malformed_ground_truth(tmp_path, payload, message):
    (tmp_path / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(payload))
    with pytest.raises(DataError, match=message):
        load_revisitop(tmp_path, "roxford5k")


def test_truncated_pickle(tmp_path):
    (tmp_path / "gnd_roxford5k.pkl").write_bytes(pickle.dumps({"imlist": []})[:-3])
    with pytest.raises(DataError, match="not a valid"):
        load_revisitop(tmp_path, "roxford5k")
