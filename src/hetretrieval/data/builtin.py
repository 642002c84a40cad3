"""The offline built-in benchmark: real photos shipped with scikit-image, each a class of controlled variants.

Every class is one photograph plus `variants_per_class` copies of it, each altered by one or two variations at a
random strength (`data/variations.py`), so retrieval must see through exactly the changes heritage collections
show: colour domain, orientation, scale, positioning, blur, ageing, occlusion. Each image carries the strength
of every variation as metadata, which the analysis can break results down by. The images are written once to a
cache folder keyed by the generation parameters (generated aside and renamed into place, so that parallel jobs
never read half of it) and then read like any CSV-manifest dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hetretrieval.data.datasets import RetrievalDataset, csv_manifest
from hetretrieval.data.images import resized_shape, save_image
from hetretrieval.data.variations import VARIATIONS, apply_variation, get_variation
from hetretrieval.errors import ConfigError, DataError
from hetretrieval.files import write_csv
from hetretrieval.seeding import mix_seed

log = logging.getLogger(__name__)

DEFAULT_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
    "retina", "camera", "coins", "clock", "moon", "motorcycle",
)
DEFAULT_VARIATIONS = ("grayscale", "sepia", "rotation", "scale", "off_centre_crop", "blur", "ageing", "occlusion")
_FORMAT_VERSION = 2  # 2: variation seeds from mix_seed


def load_skimage_photo(name: str, max_size: int | None = None) -> torch.Tensor:
    """A scikit-image sample photo as `(3, H, W)` RGB in [0, 1], longer side at most `max_size`.

    `motorcycle` is the left view of the stereo pair.
    """
    import skimage.data

    loader = (lambda: skimage.data.stereo_motorcycle()[0]) if name == "motorcycle" else getattr(skimage.data, name, None)
    if loader is None:
        raise ConfigError(f"scikit-image has no sample image '{name}'")
    array = np.asarray(loader())
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    image = torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(2, 0, 1).float() / 255.0
    height, width = resized_shape(image.shape[1], image.shape[2], max_size)
    return F.interpolate(image[None], size=(height, width), mode="bilinear", antialias=True)[0].clamp_(0, 1)


def _variant_plan(n_variants: int, variations: Sequence[str], max_combined: int, strength_range, rng):
    """For each variant, a list of (variation, strength): each variation used once first, then random combos."""
    plan = []
    for index in range(n_variants):
        count = 1 if index < len(variations) else int(rng.integers(1, max_combined + 1))
        first = variations[index % len(variations)]
        others = [v for v in rng.permutation(variations).tolist() if v != first][: count - 1]
        plan.append([(name, float(rng.uniform(*strength_range))) for name in [first, *others]])
    return plan


def generate_benchmark(
    output_dir: Path, photos: Sequence[str], variations: Sequence[str], variants_per_class: int,
    max_combined: int, strength_range: Sequence[float], seed: int, image_size: int,
) -> Path:
    """Write the variant images and `manifest.csv` (filename, label, one strength column per variation)."""
    rng = np.random.default_rng(seed)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for class_index, photo in enumerate(photos):
        original = load_skimage_photo(photo, image_size)
        plan = [[]] + _variant_plan(variants_per_class, variations, max_combined, strength_range, rng)
        for variant_index, steps in enumerate(plan):
            image = original
            for step_index, (name, strength) in enumerate(steps):
                image = apply_variation(image, name, strength, seed=mix_seed(seed, class_index, variant_index,
                                                                                  step_index))
            filename = f"{photo}_{variant_index:02d}.png"
            save_image(image, output_dir / filename)
            strengths = dict(steps)
            rows.append({"filename": filename, "label": photo,
                         "variations": "+".join(name for name, _ in steps) or "original",
                         **{name: f"{strengths.get(name, 0.0):.3f}" for name in variations}})
    return write_csv(output_dir / "manifest.csv", list(rows[0]), [list(row.values()) for row in rows])


def _generate_into_place(folder: Path, **options) -> None:
    """Generate the benchmark into a folder unique to this process, then rename it to `folder` in one step.

    Parallel jobs on a fresh cache (a launcher's sweep) each generate; the first rename wins and the others use
    its folder. A `folder` without `manifest.csv` is what an older version's interrupted in-place generation
    left: moved aside (one process wins that rename too) and replaced.
    """
    partial, stale = (folder.with_name(f".{folder.name}.{os.getpid()}.{kind}") for kind in ("partial", "stale"))
    n_images = len(options["photos"]) * (options["variants_per_class"] + 1)
    log.info("generating the built-in benchmark (%d images, once) into %s", n_images, folder)
    start = time.perf_counter()
    try:
        generate_benchmark(partial, **options)
        try:
            os.rename(partial, folder)
        except OSError:
            if (folder / "manifest.csv").is_file():
                return  # another process finished first, with the same images
            try:
                os.rename(folder, stale)
            except FileNotFoundError:
                pass  # another process moved it aside
            os.rename(partial, folder)
    except OSError as error:
        if (folder / "manifest.csv").is_file():
            return  # another process renamed its folder in between
        raise DataError(f"cannot generate the built-in benchmark in {folder} ({error.strerror or error})") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
    log.info("generated the built-in benchmark in %.1f s", time.perf_counter() - start)


def builtin_benchmark(
    cache_dir: str | Path,
    photos: Sequence[str] = DEFAULT_PHOTOS,
    variations: Sequence[str] = DEFAULT_VARIATIONS,
    variants_per_class: int = 9,
    max_combined: int = 3,
    strength_range: Sequence[float] = (0.5, 1.0),
    image_size: int = 384,
    seed: int = 0,
    name: str = "builtin",
    query: Mapping | None = None,
    database: Mapping | None = None,
) -> RetrievalDataset:
    """The built-in variation benchmark, generated on first use into `cache_dir` and deterministic for `seed`."""
    photos, variations = list(photos), list(variations)
    for variation in variations:
        get_variation(variation)
    if len(photos) < 2 or variants_per_class < 1 or image_size < 32:
        raise ConfigError("the built-in benchmark needs >= 2 photos, >= 1 variant per class and image_size >= 32")
    if not (0.0 <= strength_range[0] <= strength_range[1] <= 1.0) or not 1 <= max_combined <= len(VARIATIONS):
        raise ConfigError(f"invalid strength_range {list(strength_range)} or max_combined {max_combined}")
    params = dict(photos=photos, variations=variations, variants_per_class=variants_per_class,
                  max_combined=max_combined, strength_range=list(strength_range), image_size=image_size,
                  seed=seed, v=_FORMAT_VERSION)
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache_dir).expanduser() / f"builtin-{key}"
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        _generate_into_place(folder, photos=photos, variations=variations, variants_per_class=variants_per_class,
                             max_combined=max_combined, strength_range=strength_range, seed=seed,
                             image_size=image_size)
    return csv_manifest(manifest, name=name, query=query, database=database)
