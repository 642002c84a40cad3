"""Every option of every config group composes, every `_target_` it names resolves, and every option builds on
tiny inputs (random or offline weights) into objects whose outputs have the expected shapes."""

from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import SHARED_DATA
from hetretrieval.config import CONFIG_DIR, EvaluationOptions, ExtractionOptions, instantiate, typed
from hetretrieval.data.images import save_image
from hetretrieval.errors import ConfigError, DataError
from hetretrieval.extraction.batching import ImageSource
from hetretrieval.models.backbones import Backbone
from hetretrieval.models.local.features import LocalFeatures
from hetretrieval.training.whitening_fit import WhiteningOptions

EVAL_GROUPS = sorted(next(iter(entry)) for entry in OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "eval.yaml"))[
    "defaults"] if isinstance(entry, dict) and next(iter(entry)) != "hydra")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _targets(node):
    if OmegaConf.is_dict(node):
        if "_target_" in node:
            yield node["_target_"]
        for key in node:
            if not OmegaConf.is_missing(node, key) and OmegaConf.is_config(node[key]):
                yield from _targets(node[key])


def _scalars(node, prefix=""):
    """`(dotted key, value)` of every plain (non-interpolated) value of a nested dict."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}.")
        elif not (isinstance(value, str) and "${" in value) and value != "???":
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("group,option", [(g, o) for g in EVAL_GROUPS for o in _options(g)])
def test_option_composes_with_the_eval_config(compose_eval, group, option):
    # experiments named finetune_* are fine-tuning experiments of `hetretrieval-train` (conf/train.yaml)
    config_name = "train" if group == "experiment" and option.startswith("finetune") else "eval"
    cfg = compose_eval(f"{group}={option}", config_name=config_name)
    targets = list(_targets(cfg))
    assert targets and all(callable(hydra.utils.get_object(target)) for target in targets)
    source = CONFIG_DIR / group / f"{option}.yaml"
    if "@package _global_" not in source.read_text():  # the option's own values reached its group's node
        written = OmegaConf.to_container(OmegaConf.load(source), resolve=False)
        written.pop("defaults", None)
        for key, value in _scalars(written):
            assert OmegaConf.select(cfg[group], key) == value, (group, option, key)
    extraction = typed(cfg.extraction, ExtractionOptions, "extraction")  # every section still validates
    if config_name == "eval":
        typed(cfg.evaluation, EvaluationOptions, "evaluation")
    typed(cfg.whitening, WhiteningOptions, "whitening")
    assert extraction.batch_size >= 1


# --- every option of every group built on tiny inputs, outputs checked -----------------------------------

# (channels, map height, map width) of each backbone on a 64 x 96 image: CNNs at their stride (TF-"same" convs
# round up), ViTs after each side is resized to the nearest multiple of the patch (64 -> 70, 96 -> 98 at 14)
BACKBONE_MAPS = {
    "efficientnet_lite0": (1280, 2, 3), "efficientnet_lite1": (1280, 2, 3), "efficientnet_lite2": (1280, 2, 3),
    "resnet50": (2048, 2, 3), "resnet101": (2048, 2, 3), "vgg16": (512, 4, 6),  # conv5_3: stride 16
    "dinov2_vits14": (384, 5, 7), "dinov2_vitb14": (768, 5, 7), "clip_vitb16": (768, 4, 6),
}
IMAGES = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def lite0():
    return Backbone("tf_efficientnet_lite0", pretrained=False).eval()


def _textured_image() -> torch.Tensor:
    import skimage.data
    from skimage.transform import resize

    return torch.from_numpy(resize(skimage.data.astronaut(), (96, 128), anti_aliasing=True)).permute(2, 0, 1).float()


def _check_local_features(extractor, channels):
    image = _textured_image()
    found = extractor(image)
    assert isinstance(found, LocalFeatures) and found.image_size == (96, 128) and len(found) > 0
    assert found.descriptors.shape[1] == channels
    assert (found.keypoints >= -1).all() and (found.keypoints[:, 0] <= 128).all() and (found.keypoints[:, 1] <= 96).all()


def _build_backbone(compose, option, lite0, tmp_path):
    cfg = compose()
    backbone = instantiate(cfg.backbone, pretrained=False).eval()
    with torch.inference_mode():
        features = backbone(IMAGES)
    assert features.shape == (2, *BACKBONE_MAPS[option]) and features.shape[1] == backbone.out_channels
    if option == "vgg16":  # cirtorch's map: features[:-1], pool5 dropped
        with torch.inference_mode():
            conv5_3 = backbone.model.features[:-1]((IMAGES - backbone.mean) / backbone.std)
        torch.testing.assert_close(features, conv5_3)


def _build_pooling(compose, option, lite0, tmp_path):
    cfg = compose()
    from hetretrieval.models.factory import build_head
    from hetretrieval.models.local.pipeline import LOCAL_EXTRACTORS
    from hetretrieval.models.network import RetrievalNetwork

    backbone = lite0
    if option == "cls":  # the class token needs a transformer
        backbone = instantiate(compose("backbone=dinov2_vits14").backbone, pretrained=False).eval()
    if option == "delf":  # one scale: receptive fields measured for one input size only (fast)
        cfg = compose("pooling.scales=[1.0]")
    head = build_head(cfg.pooling, backbone)
    if isinstance(head, LOCAL_EXTRACTORS):
        _check_local_features(head, 32 if option == "orb" else head.features.out_channels)
        return
    with torch.inference_mode():
        descriptors = RetrievalNetwork(backbone, {option: head}).eval()(IMAGES)[option]
    dims = {"netvlad": 64 * 512, "cls": 384}
    assert descriptors.shape == (2, dims.get(option, 1280))
    torch.testing.assert_close(descriptors.norm(dim=1), torch.ones(2))


def _build_rerank(compose, option, lite0, tmp_path):
    cfg = compose()
    from hetretrieval.models.factory import build_head

    assert cfg.rerank.top_k == 100
    if option == "delf":
        cfg = compose("rerank.local.scales=[1.0]")
    extractor = build_head(cfg.rerank.local, lite0)
    _check_local_features(extractor, 32 if option == "orb" else extractor.features.out_channels)


DATASET_SIZES = {  # records, queries, database, classes
    "builtin": (8, 8, 8, 4), "folder": (4, 4, 4, 2), "csv": (4, 4, 4, 2), "heritage_wild": (40, 24, 40, 8),
}


def _build_dataset(compose, option, lite0, tmp_path):
    overrides = {"builtin": ["dataset.photos=[astronaut,coffee,chelsea,rocket]", "dataset.variants_per_class=1",
                             "dataset.image_size=32"],
                 "folder": [f"dataset.root={tmp_path / 'images'}"],
                 "csv": [f"dataset.manifest={tmp_path / 'images' / 'labels.csv'}"]}
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(2):
            save_image(torch.rand(3, 8, 12), tmp_path / "images" / label / f"{i}.png")
    (tmp_path / "images" / "labels.csv").write_text("filename,label\na/0.png,a\na/1.png,a\nb/0.png,b\nb/1.png,b\n")
    cfg = compose(*overrides.get(option, []))
    needs = {"heritage_wild": "heritage-wild", "pacs": "pacs-dev", "pacs_sketch_to_photo": "pacs-dev"}
    if option in needs and not (SHARED_DATA / needs[option]).is_dir():
        pytest.skip(f"shared data {needs[option]} not found")
    if option in ("alegoria", "roxford5k", "rparis6k"):  # data that cannot ship: a one-line start-up failure
        if option != "alegoria" and (SHARED_DATA / "revisitop" / "jpg").is_dir():
            pytest.skip("revisitop images present: covered by the revisitop integration tests")
        with pytest.raises((DataError, ConfigError)) as error:
            instantiate(cfg.dataset)
        assert "\n" not in str(error.value)
        return
    dataset = instantiate(cfg.dataset)
    labels = dataset.labels
    sizes = (len(dataset), len(dataset.query_ids), len(dataset.database_ids),
             len({labels[i] for i in dataset.query_ids}))
    if option in DATASET_SIZES:
        assert sizes == DATASET_SIZES[option]
    else:  # pacs-dev: 7 classes; sketch -> photo queries only sketches, the database only photos
        assert sizes[0] > 0 and sizes[3] == 7
        if option == "pacs_sketch_to_photo":
            assert {dataset.records[i].metadata["domain"] for i in dataset.query_ids} == {"sketch"}
            assert {dataset.records[i].metadata["domain"] for i in dataset.database_ids} == {"photo"}
    assert all(labels[i] is not None for i in dataset.query_ids)


def _build_extraction(compose, option, lite0, tmp_path):
    cfg = compose()
    options = typed(cfg.extraction, ExtractionOptions, "extraction")
    source = ImageSource(options.max_size, options.max_pixels)
    assert source.shape(1600, 1200) == (800, 600) and source.shape(300, 200) == (300, 200)  # never upscaled


def _build_whitening(compose, option, lite0, tmp_path):
    cfg = compose()
    from hetretrieval.training.whitening_fit import fit_descriptor_whitening

    options = typed(cfg.whitening, WhiteningOptions, "whitening")
    assert options.kind == option
    if option == "none":
        return
    descriptors = torch.randn(40, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = [str(i // 2) for i in range(40)]
    options = WhiteningOptions(option, dim=4, shrinkage=options.shrinkage)
    whitening = fit_descriptor_whitening(descriptors, options, labels)
    whitened = whitening(descriptors)
    assert whitened.shape == (40, 4)
    torch.testing.assert_close(whitened.norm(dim=1), torch.ones(40, dtype=torch.float64))


def _build_local_search(compose, option, lite0, tmp_path):
    cfg = compose()
    from hetretrieval.index.local import LocalSearchOptions, build_descriptor_index

    options = typed(OmegaConf.create(OmegaConf.to_container(cfg.local_search, resolve=True)), LocalSearchOptions,
                    "local_search")
    descriptors = np.random.default_rng(0).normal(size=(300, 40)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    index = build_descriptor_index(descriptors, options)
    # 8 sub-quantizers of 2-bit codes: 300 descriptors train 2^2 centroids (39 per centroid)
    assert (index.ntotal, index.pq.M, index.pq.nbits) == (300, options.pq_subquantizers, 2)
    _, found = index.search(descriptors[:5], options.neighbours)
    assert found.shape == (5, 10) and (found >= 0).all()


def _build_verification(compose, option, lite0, tmp_path):
    cfg = compose()
    verifier = instantiate(cfg.verification)
    points = np.random.default_rng(0).uniform(0, 100, (30, 2)).astype(np.float32)
    moved = points @ np.array([[0.9, 0.1], [-0.1, 0.9]], np.float32) + np.float32([4.0, -2.0])
    moved[:5] += 40.0  # five outliers
    (inliers,) = verifier([(points, moved)])
    assert inliers.tolist() == [False] * 5 + [True] * 25


def _build_logger(compose, option, lite0, tmp_path):
    cfg = compose()
    from pytorch_lightning.loggers import CSVLogger, WandbLogger

    from hetretrieval.loggers import build_loggers

    loggers = build_loggers(cfg, "tiny-run")
    kinds = {"csv": [CSVLogger], "wandb": [WandbLogger], "many_loggers": [WandbLogger, CSVLogger]}[option]
    assert [type(logger) for logger in loggers] == kinds
    for logger in loggers:
        if isinstance(logger, CSVLogger):
            logger.log_metrics({"val/mAP": 0.5}, step=0)
            logger.save()
            assert "val/mAP" in (Path(logger.log_dir) / "metrics.csv").read_text()
        else:  # offline W&B, its files under the run folder, started only when first used
            assert logger._offline and str(logger.save_dir).startswith(str(tmp_path))


def _build_trainer(compose, option, lite0, tmp_path):
    cfg = compose()
    if option == "ddp":
        assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.strategy) == ("gpu", -1, "ddp")
        assert cfg.trainer.num_nodes == 1  # trainer.num_nodes=<n> for a multi-node job (README "Running on a cluster")
        if not torch.cuda.is_available():
            pytest.skip("trainer=ddp needs GPUs")
    trainer = instantiate(cfg.trainer, logger=False)
    assert trainer.num_devices == (2 if option == "ddp_sim" else 1 if option != "ddp" else torch.cuda.device_count())
    assert trainer.precision == "32-true"
    if option in ("cpu", "ddp_sim"):
        assert type(trainer.accelerator).__name__ == "CPUAccelerator"


def _build_composed_only(compose, option, lite0, tmp_path):
    """debug, paths: configurations of other groups, checked here by value (experiments: by the compose test)."""
    cfg = compose()
    if option == "fast":
        assert cfg.trainer.fast_dev_run and cfg.extraction.max_size == 128 and cfg.logger is None and not cfg.cache
    if option == "default":
        assert Path(cfg.paths.data_dir) == SHARED_DATA and Path(cfg.paths.output_dir) == tmp_path / "run"


BUILDERS = {"backbone": _build_backbone, "pooling": _build_pooling, "rerank": _build_rerank,
            "dataset": _build_dataset, "extraction": _build_extraction, "whitening": _build_whitening,
            "local_search": _build_local_search, "verification": _build_verification, "logger": _build_logger,
            "trainer": _build_trainer}


@pytest.mark.parametrize("group,option", [(g, o) for g in EVAL_GROUPS for o in _options(g)
                                          if g not in ("experiment", "debug", "paths") or o in ("fast", "default")])
def test_option_builds_and_gives_outputs_of_the_expected_shape(compose_eval, lite0, tmp_path, group, option):
    def compose(*overrides):
        return compose_eval(f"{group}={option}", *overrides)

    BUILDERS.get(group, _build_composed_only)(compose, option, lite0, tmp_path)


def test_config_dir_is_the_repository_conf():
    assert CONFIG_DIR == Path(__file__).resolve().parents[1] / "conf"
