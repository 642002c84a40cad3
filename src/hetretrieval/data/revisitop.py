"""Revisited Oxford and Paris (Radenović et al., CVPR 2018): ground truth, image layout, query crops.

The official release is a pickle per dataset (`gnd_roxford5k.pkl`, `gnd_rparis6k.pkl`) holding `imlist`,
`qimlist` and, per query, the bounding box `bbx` and the database indices labelled `easy`, `hard` and `junk`.
Pickles can execute code, so they are read with an unpickler that only rebuilds plain containers, numbers,
strings and numpy arrays, and refuses to build more than a bound (`bytearray(10**12)` is a few bytes).
"""

from __future__ import annotations

import builtins
import io
import math
import pickle
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hetretrieval.data.datasets import ImageRecord, RetrievalDataset
from hetretrieval.data.images import CROP_KEY
from hetretrieval.errors import ConfigError, DataError

if TYPE_CHECKING:
    pass

REVISITOP_DATASETS = ("roxford5k", "rparis6k")
GROUND_TRUTH_URL = "http://cmp.felk.cvut.cz/revisitop/data/datasets/{name}/gnd_{name}.pkl"
IMAGE_ARCHIVE_URLS = {
    "roxford5k": ("https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz",),
    "rparis6k": (
        "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_1-v1.tgz",
        "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_2-v1.tgz",
    ),
}

# The builtins that pickle itself calls (protocols 0-4; lists, dicts, numbers and strings have opcodes). `str`
# is not among them, and would be unbounded: the repr of a list holding one long string many times.
_SAFE_BUILTINS = frozenset({"set", "frozenset", "complex", "bytes", "bytearray"})
_SAFE_NUMPY = {  # (module, name): where the call's arguments give an array shape (then its dtype), or None
    ("numpy", "ndarray"): 0,
    ("numpy", "dtype"): None,
    ("numpy.core.multiarray", "_reconstruct"): 1,
    ("numpy.core.multiarray", "scalar"): None,
    ("numpy._core.multiarray", "_reconstruct"): 1,
    ("numpy._core.multiarray", "scalar"): None,
}
# Bytes (or items) that the calls and array fillings of one file may build in all. The official files make
# none; a few bytes of pickle can otherwise ask for any amount: `bytearray(n)`, an array shape, or one object
# of the file copied again and again (each array filled from the same state gets a copy).
MAX_BUILT = 1 << 26


class _MeteredArray(np.ndarray):
    """The arrays a ground-truth pickle rebuilds: filling one (the pickle's BUILD) is charged its size."""

    meter: _GroundTruthUnpickler

    def __setstate__(self, state: tuple) -> None:
        self.meter.charge(math.prod(state[-4]) * np.dtype(state[-3]).itemsize, "array data")
        super().__setstate__(state)


class _Global:
    """An allowed global as the pickle sees it: a call is charged what it may allocate before it runs; as an
    argument (numpy's `_reconstruct(ndarray, ...)`), it stands for the global itself."""

    def __init__(self, meter: _GroundTruthUnpickler, target: Any, shape_at: int | None):
        self.meter, self.target, self.shape_at = meter, target, shape_at

    def __setstate__(self, state: Any) -> None:  # the pickle's BUILD would otherwise rewrite the fields
        raise pickle.UnpicklingError("an allowed global cannot be modified")

    def __call__(self, *args: Any) -> Any:
        args = tuple(arg.target if isinstance(arg, _Global) else arg for arg in args)
        self.meter.charge(self._cost(args), getattr(self.target, "__name__", "a global"))
        built = self.target(*args)
        if isinstance(built, _MeteredArray):
            built.meter = self.meter
        return built

    def _cost(self, args: tuple) -> int:
        """A bound on what the call allocates: an array's bytes, `bytes(n)`'s n, or the length it copies."""
        if self.shape_at is not None:
            shape = args[self.shape_at]
            dtype = args[self.shape_at + 1] if len(args) > self.shape_at + 1 else float
            dims = shape if isinstance(shape, tuple | list) else (shape,)
            return math.prod(abs(int(n)) for n in dims) * np.dtype(dtype).itemsize
        return sum(abs(arg) if isinstance(arg, int) else len(arg) if hasattr(arg, "__len__") else 0
                   for arg in args)


class _GroundTruthUnpickler(pickle.Unpickler):
    """Rebuilds builtin containers/scalars and numpy arrays only, any other global refused, and builds through
    calls and array fillings at most `MAX_BUILT` in all."""

    def __init__(self, file: io.BytesIO):
        super().__init__(file)
        self.built = 0

    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in _SAFE_BUILTINS:
            return _Global(self, getattr(builtins, name), None)
        if (module, name) in _SAFE_NUMPY:
            target = _MeteredArray if name == "ndarray" else super().find_class(module, name)
            return _Global(self, target, _SAFE_NUMPY[module, name])
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a ground-truth file")

    def charge(self, cost: int, what: str) -> None:
        self.built += cost
        if self.built > MAX_BUILT:
            raise pickle.UnpicklingError(f"it asks for more than {MAX_BUILT:,} bytes ({what}), far more than "
                                         "any ground-truth file needs")


@dataclass(frozen=True)
class RevisitopQuery:
    """One query: its image name, bounding box `(x1, y1, x2, y2)` in pixels and labelled database indices.

    `easy`, `hard`, `junk`: sorted, read-only `(n,)` int64 indices into `RevisitopGroundTruth.imlist`.
    """

    name: str
    bbx: tuple[float, float, float, float]
    easy: np.ndarray
    hard: np.ndarray
    junk: np.ndarray


@dataclass(frozen=True)
class RevisitopGroundTruth:
    """A revisited dataset: database image names, query image names and one `RevisitopQuery` per query."""

    name: str
    imlist: tuple[str, ...]
    qimlist: tuple[str, ...]
    queries: tuple[RevisitopQuery, ...]


def ground_truth_path(root: str | Path, name: str) -> Path:
    """`root/gnd_<name>.pkl`, the official file name."""
    return Path(root) / f"gnd_{_check_name(name)}.pkl"


def image_path(root: str | Path, image_name: str) -> Path:
    """`root/jpg/<image_name>.jpg`, the official layout of the extracted image archives."""
    return Path(root) / "jpg" / f"{image_name}.jpg"


def load_revisitop(root: str | Path, name: str) -> RevisitopGroundTruth:
    """Read and validate `root/gnd_<name>.pkl` (`name` in `REVISITOP_DATASETS`)."""
    path = ground_truth_path(root, name)
    if not path.is_file():
        raise DataError(f"revisitop ground truth not found: {path} (run download_revisitop or fetch it manually)")
    try:
        raw = _GroundTruthUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as exc:  # any failure to rebuild untrusted bytes means a malformed file
        raise DataError(f"{path} is not a valid revisitop ground-truth pickle: {exc}") from exc
    return _parse_ground_truth(raw, name, path)


def _parse_ground_truth(raw: Any, name: str, path: Path) -> RevisitopGroundTruth:
    if not isinstance(raw, dict) or not {"imlist", "qimlist", "gnd"} <= raw.keys():
        raise DataError(f"{path}: expected a dict with keys 'imlist', 'qimlist', 'gnd'")
    imlist, qimlist, gnd = raw["imlist"], raw["qimlist"], raw["gnd"]
    for key, names in (("imlist", imlist), ("qimlist", qimlist)):
        if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
            raise DataError(f"{path}: '{key}' must be a list of image names")
    if not isinstance(gnd, list | tuple) or len(gnd) != len(qimlist):
        raise DataError(f"{path}: 'gnd' must hold one entry per query ({len(qimlist)})")
    queries = tuple(
        _parse_query(entry, query_name, len(imlist), f"{path} query {i}")
        for i, (entry, query_name) in enumerate(zip(gnd, qimlist, strict=True))
    )
    return RevisitopGroundTruth(name=name, imlist=tuple(imlist), qimlist=tuple(qimlist), queries=queries)


def _parse_query(entry: Any, query_name: str, n_db: int, where: str) -> RevisitopQuery:
    if not isinstance(entry, dict) or not {"bbx", "easy", "hard", "junk"} <= entry.keys():
        raise DataError(f"{where}: expected a dict with keys 'bbx', 'easy', 'hard', 'junk'")
    bbx = np.asarray(entry["bbx"], dtype=np.float64)
    if bbx.shape != (4,) or not np.all(np.isfinite(bbx)):
        raise DataError(f"{where}: 'bbx' must be 4 finite numbers (x1, y1, x2, y2)")
    labels = {}
    for key in ("easy", "hard", "junk"):
        indices = np.asarray(entry[key])
        if indices.size and (
            indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer) or indices.min() < 0
            or indices.max() >= n_db
        ):
            raise DataError(f"{where}: '{key}' must be a list of database indices in [0, {n_db})")
        indices = np.sort(indices.astype(np.int64).reshape(-1))
        indices.setflags(write=False)
        labels[key] = indices
    return RevisitopQuery(name=query_name, bbx=tuple(float(v) for v in bbx), **labels)


@dataclass(frozen=True)
class RevisitedDataset(RetrievalDataset):
    """A revisited Oxford/Paris dataset: records are the queries then `imlist` (the database, in order), and
    the ground truth travels with it so the evaluation can score the official Easy/Medium/Hard protocols."""

    ground_truth: RevisitopGroundTruth | None = None


def revisitop_dataset(root: str | Path, name: str, crop_queries: bool = True) -> RevisitedDataset:
    """The 70 queries (cropped to their `bbx` by the loader when `crop_queries`) and the `imlist` database.

    Queries are labelled by their own name, database images unlabelled: relevance comes from the ground truth
    (the official protocols), not from labels. Fails at once, in one line, when the images are not in place.
    """
    root = Path(root).expanduser().absolute()  # records outlive the working directory
    ground_truth = load_revisitop(root, name)
    folder = root / "jpg"
    missing = [n for n in (*ground_truth.qimlist, *ground_truth.imlist) if not image_path(root, n).is_file()]
    if missing:
        archives = " and ".join(IMAGE_ARCHIVE_URLS[name])
        raise DataError(f"{len(missing)} of the {name} images are missing from {folder} (e.g. {missing[0]}.jpg): "
                        f"extract {archives} into {folder}")
    queries = [ImageRecord(image_path(root, q.name), q.name,
                           {"role": "query", **({CROP_KEY: ",".join(map(str, q.bbx))} if crop_queries else {})})
               for q in ground_truth.queries]
    database = [ImageRecord(image_path(root, n), None, {"role": "database"}) for n in ground_truth.imlist]
    n_queries = len(queries)
    return RevisitedDataset(name, (*queries, *database), np.arange(n_queries, dtype=np.int64),
                            np.arange(n_queries, n_queries + len(database), dtype=np.int64), ground_truth)


def download_revisitop(name: str, root: str | Path) -> Path:
    """Fetch the official `gnd_<name>.pkl` into `root` (kept if already there); returns its path.

    The images (`IMAGE_ARCHIVE_URLS`) are large archives left to the user: extract them into `root/jpg/`.
    """
    path = ground_truth_path(root, name)
    if path.is_file():
        return path
    url = GROUND_TRUTH_URL.format(name=name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=60) as response:
            payload = response.read()
    except OSError as exc:
        raise DataError(f"could not download {url} ({exc}); download it manually to {path}") from exc
    partial = path.with_suffix(".part")
    partial.write_bytes(payload)
    partial.replace(path)
    return path


def _check_name(name: str) -> str:
    if name not in REVISITOP_DATASETS:
        raise ConfigError(f"unknown revisitop dataset '{name}'; expected one of {REVISITOP_DATASETS}")
    return name
