"""`hetretrieval-eval`: off-the-shelf retrieval evaluation of backbone x heads x dataset (Hydra entry point).

`pooling=gem` evaluates one head; `heads=[mac,spoc,gem,rmac]` (options of the `pooling` group, local `delf` and
`orb` included) runs the backbone once per image and evaluates every head. Descriptors come from the store
when nothing that determines them changed (`cache=false` turns it off); `from_run=<run dir>` re-scores a
run's saved descriptors with other evaluation settings, without a model.

`whitening=pca|lw whitening.fit_on=<dataset option>` (cirtorch's test-time `--whitening`) describes that
dataset's images (`whitening.fit_options` merged onto its node; none of them may be an evaluated query) with the
same network, fits one whitening per global head, and evaluates the whitened descriptors; the fit set's
descriptors are cached like any others, and `summary.json` records the whitening under `whitening`.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from hetretrieval.allocator import keep_freed_memory
from hetretrieval.config import (
    CONFIG_DIR,
    EvaluationOptions,
    ExtractionOptions,
    check_entry_point,
    compose_option,
    instantiate,
    typed,
)
from hetretrieval.errors import ConfigError, HetRetrievalError

log = logging.getLogger(__name__)


def head_nodes(cfg: DictConfig) -> dict[str | None, DictConfig]:
    """The heads to evaluate by option name: `heads=[...]` composed from the `pooling` group (the `pooling=`
    option keeps its command-line overrides, e.g. `heads=[mac,gem] pooling=gem pooling.p=4`), else the one
    `pooling` node (named later, after its option)."""
    chosen = cfg.pooling
    names = [str(name) for name in cfg.get("heads") or []]
    if not names:
        return {None: chosen}
    if len(set(names)) != len(names):
        raise ConfigError(f"heads lists a head twice: {names}")
    nodes = {}
    for name in names:
        node = compose_option("pooling", name, cfg)
        nodes[name] = chosen if node.get("_target_") == chosen.get("_target_") else node
    return nodes


def _pooling_choice(head) -> str:
    """The `pooling=` option of a single-head run (Hydra's choice), else the head's own name."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return str(HydraConfig.get().runtime.choices["pooling"])
    except ValueError:  # composed outside a Hydra run (tests, notebooks)
        return str(getattr(head, "name", "head"))


def evaluate(cfg: DictConfig) -> dict | None:
    """Validate every option, claim the output folder, then describe (or re-use) and evaluate.

    Returns the summary of the single head, or `{head: summary}` with several heads; None in the launching
    process of a spawned DDP run (rank 0 evaluates and writes the files there).
    """
    extraction = typed(cfg.extraction, ExtractionOptions, "extraction")
    evaluation = typed(cfg.evaluation, EvaluationOptions, "evaluation")
    test_time_whitening = _whitening_options(cfg)  # checked before any weight or image is read
    if test_time_whitening is not None and cfg.get("from_run"):
        raise ConfigError("from_run re-scores saved descriptors as they are: drop whitening=")
    from hetretrieval.evaluation.run_files import claim_output_dir, release_output_dir

    # under a DDP launcher every rank runs this function; only rank 0 writes (and so claims) the folder
    output_dir = claim_output_dir(cfg.paths.output_dir) if _global_rank() == 0 else Path(cfg.paths.output_dir)
    try:
        if cfg.get("from_run"):
            from hetretrieval.evaluation.rescore import rescore_run

            return rescore_run(cfg.from_run, output_dir, evaluation, cfg)
        summaries = _describe_and_evaluate(cfg, extraction, evaluation, output_dir)
    finally:
        release_output_dir(output_dir)
    if summaries is None:
        return None
    return next(iter(summaries.values())) if len(summaries) == 1 else summaries


def _describe_and_evaluate(cfg: DictConfig, options: ExtractionOptions, evaluation: EvaluationOptions,
                           output_dir: Path) -> dict | None:
    from hetretrieval.evaluation.run import RunEvaluation
    from hetretrieval.evaluation.scoring import LocalScoring
    from hetretrieval.extraction.batching import ImagePlan, ImageSource
    from hetretrieval.extraction.engine import ExtractionEngine, default_device
    from hetretrieval.extraction.store import CachedHeads, DescriptorStore, extraction_fingerprint
    from hetretrieval.index.local import LocalSearchOptions
    from hetretrieval.models.checkpoints import load_fine_tuned
    from hetretrieval.models.factory import build_head, build_heads
    from hetretrieval.models.network import RetrievalNetwork
    from hetretrieval.seeding import seed_everything

    seed_everything(cfg.seed)
    nodes = head_nodes(cfg)
    rerank = cfg.get("rerank")
    local_search = typed(OmegaConf.create(OmegaConf.to_container(cfg.local_search, resolve=True)),
                         LocalSearchOptions, "local_search")
    verifier = instantiate(cfg.verification)
    dataset = instantiate(cfg.dataset)
    whitening = {}
    if cfg.get("checkpoint"):  # a fine-tuned model from hetretrieval-train (backbone/pooling groups unused)
        if cfg.get("heads"):
            raise ConfigError("checkpoint= evaluates the fine-tuned head it holds: drop heads=[...]")
        fine_tuned = load_fine_tuned(cfg.checkpoint)
        backbone, name = fine_tuned.backbone, fine_tuned.architecture["head"]["name"]
        whitening = {name: fine_tuned.whitening}
        nodes = {name: OmegaConf.create(fine_tuned.architecture["head"])}
        global_heads, local = {name: fine_tuned.head}, {}
    else:
        backbone = instantiate(cfg.backbone)
        global_heads, local = build_heads(nodes, backbone)
        if None in nodes:  # a single pooling=<option>: named after its option
            group = global_heads or local
            name = _pooling_choice(group[None])
            group[name] = group.pop(None)
            nodes = {name: nodes[None]}
    built = {**global_heads, **local}
    if rerank and local:
        raise ConfigError(f"rerank re-ranks a global descriptor's ranking, not pooling={', '.join(local)}")
    rerank_name = None
    if rerank:
        reranker = build_head(rerank.local, backbone)
        rerank_name = f"rerank_{reranker.name}"
        local[rerank_name] = reranker

    source = ImageSource(options.max_size, options.max_pixels, bucketing=options.bucketing,
                         stride=int(getattr(backbone, "stride", 32)))
    aggregation = options.scale_aggregation
    network = RetrievalNetwork(backbone, global_heads, options.scales, whitening, aggregation) if global_heads else None
    plan = ImagePlan.scan(dataset.records, source)
    device = default_device() if str(cfg.trainer.get("accelerator", "auto")) != "cpu" else "cpu"
    if network is not None:  # data-initialised heads (NetVLAD) learn from the images before extraction
        engine = ExtractionEngine.from_options(network, None, options).to(device)
        engine.prepare(dataset, plan)
        engine.cpu()

    store = DescriptorStore(Path(cfg.paths.cache_dir) / "descriptors" if cfg.get("cache", True) else None,
                            dtype=cfg.get("store", {}).get("dtype", "float32"))
    whitening_facts: dict = {}
    test_time = _whitening_options(cfg)
    if test_time is not None:
        if any(w is not None for w in whitening.values()):
            raise ConfigError("the checkpoint holds a fitted whitening already: drop whitening=")
        if not global_heads:
            raise ConfigError(f"whitening={test_time.kind} whitens global descriptors; "
                              f"pooling={', '.join(local)} has none")
        whitening, whitening_facts = _fit_test_time_whitening(cfg, test_time, dataset, backbone, global_heads,
                                                              options, source, store, device)
    shared = extraction_fingerprint(dataset.records, source, backbone, options.scales, aggregation,
                                    options.precision, options.channels_last)
    cache = CachedHeads(store, {name: store.key(shared, name, head, whitening.get(name))
                                for name, head in {**global_heads, **local}.items()}, len(dataset))
    # one process on one device: the engine's own loop; Lightning's Trainer for anything else (DDP, fast_dev_run...)
    trainer = instantiate(cfg.trainer, logger=False) if cache.missing and _needs_trainer(cfg.trainer) else None
    facts = {"backbone": backbone.model_name, "scales": list(options.scales), "max_size": options.max_size,
             "device": (str(trainer.strategy.root_device) if trainer is not None
                        else _device_name(device) if cache.missing else None)}
    if getattr(backbone, "layer", None) is not None:
        facts["layer"] = backbone.layer
    if len(options.scales) > 1:
        facts["scale_aggregation"] = aggregation
    specs = _specs(built, nodes, local, whitening, rerank_name, whitening_facts)
    run = RunEvaluation(output_dir, dataset, specs, evaluation, facts,
                        LocalScoring(verifier, local_search, rerank.top_k if rerank else None), cache, cfg)
    if not cache.missing:
        log.info("descriptor cache hit for %s: nothing to extract", ", ".join(cache.hits))
        return run(None)
    missing = {n: h for n, h in global_heads.items() if n in cache.missing}
    engine = ExtractionEngine.from_options(RetrievalNetwork(backbone, missing, options.scales, whitening, aggregation)
                                           if missing else None,
                                           {n: h for n, h in local.items() if n in cache.missing}, options)
    if trainer is None:
        return run(engine.to(device).extract(dataset.records, plan)) or None
    from hetretrieval.extraction.lightning import ExtractionModule

    # under DDP each rank's shard goes to the store (or, with cache=false, to the run folder): ShardSet
    trainer.predict(ExtractionModule(engine, dataset.records, plan, on_extracted=run, shards=cache.shards(output_dir)),
                    return_predictions=False)
    return run.summaries or None


# trainer options under which `trainer.predict` is the engine's own loop on one device, and the values that keep
# it so (accelerator auto: Lightning's choice and `default_device`'s agree on CUDA, MPS and CPU-only machines)
_ONE_PROCESS = {"_target_": ("pytorch_lightning.Trainer",), "accelerator": ("auto", "cpu"), "devices": (1, "1"),
                "num_nodes": (1,), "strategy": ("auto",), "precision": ("32-true", "32", 32),
                "default_root_dir": None, "use_distributed_sampler": None, "inference_mode": None,
                "enable_checkpointing": None, "enable_model_summary": None, "enable_progress_bar": None}


def _needs_trainer(node: DictConfig) -> bool:
    """Whether the `trainer` config asks for more than one process on one device (then Lightning runs it)."""
    return any(key not in _ONE_PROCESS or (_ONE_PROCESS[key] is not None and value not in _ONE_PROCESS[key])
               for key, value in node.items())


def _device_name(device) -> str:
    """`device` as Lightning's single-device strategy names it in `summary.json` (`cuda:0`, `mps:0`, `cpu`)."""
    import torch

    device = torch.device(device)
    return str(device if device.type == "cpu" or device.index is not None else torch.device(device.type, 0))


def _global_rank() -> int:
    """This process's rank under a DDP launcher, 0 otherwise: Lightning's `rank_zero_only.rank` once Lightning
    has set it, else read from the launcher's environment as Lightning reads it (without importing Lightning)."""
    from lightning_utilities.core.rank_zero import rank_zero_only

    rank = getattr(rank_zero_only, "rank", None)
    if rank is None:
        keys = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
        rank = next((int(os.environ[key]) for key in keys if key in os.environ), 0)
    return int(rank)


def _whitening_options(cfg: DictConfig):
    """The test-time whitening `whitening=pca|lw` asks for (checked), or None (`whitening=none`)."""
    from hetretrieval.training.whitening_fit import WhiteningOptions

    if cfg.get("whitening") is None:
        return None
    options = typed(cfg.whitening, WhiteningOptions, "whitening")
    if options.kind == "none":
        if options.fit_on is not None:
            raise ConfigError(f"whitening.fit_on={options.fit_on} needs whitening=pca or whitening=lw")
        return None
    if not options.fit_on:
        raise ConfigError(f"whitening={options.kind} at evaluation needs whitening.fit_on=<dataset option> "
                          "(images other than the test queries, e.g. another PACS domain)")
    return options


def _fit_test_time_whitening(cfg: DictConfig, whitening, dataset, backbone, heads: dict, options: ExtractionOptions,
                             source, store, device) -> tuple[dict, dict]:
    """Describe the `whitening.fit_on` dataset with the network (the store first) and fit one whitening per
    global head on its descriptors: `({head: Whitening}, {head: summary facts})`."""
    import torch

    from hetretrieval.extraction.engine import ExtractionEngine
    from hetretrieval.extraction.store import CachedHeads, extraction_fingerprint
    from hetretrieval.models.network import RetrievalNetwork
    from hetretrieval.training.whitening_fit import fit_descriptor_whitening

    node = compose_option("dataset", whitening.fit_on, cfg)
    fit_options = dict(whitening.fit_options or {})
    unknown = sorted(set(fit_options) - set(node.keys()))
    if unknown:
        raise ConfigError(f"whitening.fit_options.{unknown[0]} is no option of dataset={whitening.fit_on} "
                          f"(its options: {', '.join(k for k in node.keys() if k != '_target_')})")
    if fit_options:
        node = OmegaConf.merge(node, OmegaConf.create(fit_options))
    fit = instantiate(node)
    queries = {str(dataset.records[i].path) for i in dataset.query_ids}
    shared_images = sum(str(record.path) in queries for record in fit.records)
    if shared_images:
        raise ConfigError(f"whitening.fit_on={whitening.fit_on} shares {shared_images} images with the evaluated "
                          f"queries: fit on other images (e.g. whitening.fit_options={{domains: [art_painting]}})")
    shared = extraction_fingerprint(fit.records, source, backbone, options.scales, options.scale_aggregation,
                                    options.precision, options.channels_last)
    cache = CachedHeads(store, {name: store.key(shared, name, head) for name, head in heads.items()}, len(fit))
    fresh = None
    if cache.missing:
        log.info("describing %d images of %s to fit %s-whitening", len(fit), fit.name, whitening.kind)
        network = RetrievalNetwork(backbone, {n: h for n, h in heads.items() if n in cache.missing}, options.scales,
                                   None, options.scale_aggregation)
        engine = ExtractionEngine.from_options(network, None, options).to(device)
        fresh = engine.extract(fit.records, source)
        engine.cpu()
    described = cache.complete(fresh)
    labels = [record.label for record, valid in zip(fit.records, described.valid, strict=True) if valid]
    fitted, facts = {}, {}
    for name in heads:
        descriptors = torch.from_numpy(described.descriptors[name][described.valid])
        fitted[name] = fit_descriptor_whitening(descriptors, whitening, labels)
        facts[name] = {"whitening": {"kind": whitening.kind, "dim": fitted[name].out_features,
                                     "shrinkage": whitening.shrinkage, "fit_on": fit.name,
                                     "fit_option": whitening.fit_on, "fit_options": fit_options,
                                     "fit_images": int(described.valid.sum())}}
    return fitted, facts


def _specs(built: dict, nodes: dict, local: dict, whitening: dict, rerank_name: str | None,
           head_facts: dict | None = None) -> list:
    """What each evaluated head is called and how it is scored (after data-initialised heads are fitted);
    `head_facts` adds to a global head's summary facts (its test-time whitening)."""
    from hetretrieval.evaluation.run import HeadSpec

    specs = []
    for name, head in built.items():
        descriptor = getattr(head, "name", name) + ("+whitening" if whitening.get(name) is not None else "")
        config = OmegaConf.to_container(nodes[name], resolve=True)
        if name in local:
            specs.append(HeadSpec(name, descriptor, local=True, pca_dim=getattr(head, "pca_dim", None), config=config,
                                  facts={"local_features": head.name, "scorer": getattr(head, "scorer_name", None)}))
        elif rerank_name is not None:
            reranker = local[rerank_name]
            specs.append(HeadSpec(name, f"{descriptor}+{rerank_name}", rerank=rerank_name, config=config,
                                  facts={"local_features": reranker.name,
                                         "scorer": getattr(reranker, "scorer_name", None),
                                         **(head_facts or {}).get(name, {})}))
        else:
            specs.append(HeadSpec(name, descriptor, config=config, facts=(head_facts or {}).get(name, {})))
    return specs


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def main(cfg: DictConfig) -> float | None:
    """Run one evaluation; returns mAP (of the single head) so that Hydra sweepers can optimise it."""
    keep_freed_memory()
    os.environ.setdefault("WANDB_SILENT", "true")
    # our size-bucket sampler returns every index (tested) and predict_step returns nothing on purpose (the
    # engine collects); Lightning cannot know and warns on every run, as about its own pytree internals
    for message in (".*custom batch sampler.*", ".*predict returned None.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message=message)
    try:
        check_entry_point(cfg, "hetretrieval-eval")
        summary = evaluate(cfg)
    except HetRetrievalError as error:
        log.error("%s", error)  # the run's log file says why it stopped, too
        raise SystemExit(f"hetretrieval: {error}") from None
    return summary.get("mAP") if summary and "mAP" in summary else None


if __name__ == "__main__":
    main()
