"""Revisitop helpers without real data: layout, query crops, download failure, malformed and hostile gnd."""

import pickle
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hetretrieval.data.images import clip_box
from hetretrieval.data.revisitop import (
    download_revisitop,
    image_path,
    load_revisitop,
    revisitop_dataset,
)
from hetretrieval.errors import ConfigError, DataError


def test_image_path_follows_official_layout():
    assert image_path("/data/roxford5k", "all_souls_000013") == Path("/data/roxford5k/jpg/all_souls_000013.jpg")


def test_query_boxes_round_and_clip_to_the_image():
    assert clip_box(80, 100, (10.4, 20.6, 50.5, 60.2)) == (10, 21, 50, 60)
    assert clip_box(80, 100, (-5.0, -3.0, 140.0, 95.0)) == (0, 0, 100, 80)
    with pytest.raises(ValueError, match="does not overlap"):
        clip_box(80, 100, (120.0, 10.0, 150.0, 40.0))


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


class _Call:
    """Pickles as the call `function(*args)`: what a crafted ground-truth file may hold."""

    def __init__(self, function, *args, state=None):
        self.function, self.args, self.state = function, args, state

    def __reduce__(self):
        return (self.function, self.args) if self.state is None else (self.function, self.args, self.state)


def _gnd(tmp_path, extra):
    payload = {"imlist": ["a"], "qimlist": ["q"], "extra": extra,
               "gnd": [{"bbx": np.array([0.0, 0, 1, 1]), "easy": np.array([0]), "hard": [], "junk": []}]}
    (tmp_path / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(payload, protocol=4))


_MEGABYTE = b"x" * (1 << 20)
_ARRAY_STATE = np.arange(1 << 17).__reduce__()[2]  # 1 MB of int64


@pytest.mark.parametrize(
    "extra",
    [
        _Call(bytearray, 1 << 60),  # a few bytes of pickle asking for an exbibyte
        _Call(bytes, 1 << 60),
        _Call(np.ndarray, (1 << 40,)),
        [_Call(bytearray, _MEGABYTE) for _ in range(80)],  # one megabyte of the file, copied 80 times
        [_Call(np.ndarray, (0,), state=_ARRAY_STATE) for _ in range(80)],  # one array's state fills 80 arrays
    ],
    ids=["bytearray", "bytes", "ndarray", "copies", "array-fillings"],
)
def test_ground_truth_cannot_ask_for_unbounded_memory(tmp_path, extra):
    _gnd(tmp_path, extra)
    with pytest.raises(DataError, match=r"asks for more than 67,108,864 bytes"):
        load_revisitop(tmp_path, "roxford5k")


def test_allowed_globals_cannot_be_rewritten(tmp_path):
    # ndarray, then BUILD {"shape_at": None}: its calls would no longer be charged for their shape
    crafted = b"\x80\x04cnumpy\nndarray\n}\x8c\x08shape_atNsb."
    (tmp_path / "gnd_roxford5k.pkl").write_bytes(crafted)
    with pytest.raises(DataError, match="cannot be modified"):
        load_revisitop(tmp_path, "roxford5k")


def test_ground_truth_with_numpy_arrays_and_small_calls_loads(tmp_path):
    _gnd(tmp_path, [bytearray(b"ab"), {1, 2}, frozenset({3}), complex(1, 2), np.int64(4)])
    (query,) = load_revisitop(tmp_path, "roxford5k").queries
    assert query.bbx == (0.0, 0.0, 1.0, 1.0) and query.easy.tolist() == [0] and type(query.easy) is np.ndarray


def test_revisitop_dataset_records_absolute_paths(tmp_path, monkeypatch):
    root = tmp_path / "roxford"
    (root / "jpg").mkdir(parents=True)
    _gnd(root, None)
    for name in ("a", "q"):
        Image.new("RGB", (4, 4)).save(image_path(root, name))
    monkeypatch.chdir(tmp_path)
    dataset = revisitop_dataset("roxford", "roxford5k")
    assert [r.path for r in dataset.records] == [root / "jpg" / "q.jpg", root / "jpg" / "a.jpg"]
