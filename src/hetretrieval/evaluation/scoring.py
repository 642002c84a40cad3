"""Score one descriptor of a run: one search, reused by every metric the dataset's protocol defines.

Global descriptors are ranked by exact search (or, `evaluation.search: ivfpq | hnsw`, an exactly re-scored
approximate short-list), local features by votes and spatial verification; a global ranking may be re-ranked by
local features. Whatever produced the ranking, it is scored once by
`evaluate_rankings` and, for Revisited Oxford/Paris, the very same ranking by the official Easy/Medium/Hard
protocols: no second search, and the revisited scores exist for every descriptor kind.

With `evaluation.query_expansion` / `evaluation.dba` set, the descriptors are first expanded
(`index.expansion.expand_for_search`: DBA of the database, then αQE of the queries, a query never expanding
with its own database entry) and searched again; the run is scored once without and once with expansion, and
`mAP_before_expansion` (with the settings) joins the info. The saved descriptors stay the unexpanded ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from hetretrieval.config import EvaluationOptions
from hetretrieval.data.datasets import RetrievalDataset
from hetretrieval.index.expansion import expand_for_search
from hetretrieval.index.local import (
    LocalSearchOptions,
    build_descriptor_index,
    index_memory,
    local_rankings,
    reduce_dimension,
    rerank_rankings,
    stack_descriptors,
)
from hetretrieval.index.search import (
    RankingBatch,
    approximate_parameters,
    approximate_rankings,
    build_approximate_index,
    iter_rankings,
    on_gpus,
    select_rows,
    similarity_batches,
)
from hetretrieval.metrics.retrieval import (
    FULL_RANKING_AP,
    SHORTLIST_AP,
    Protocol,
    RetrievalResults,
    evaluate_rankings,
    evaluate_similarities,
    metric_summary,
    search_protocol,
)
from hetretrieval.metrics.revisited import evaluate_revisited, revisited_summary
from hetretrieval.models.local.features import LocalFeatures
from hetretrieval.models.local.ransac import GeometricVerifier


@dataclass(frozen=True)
class LocalScoring:
    """How local features are searched (`search`) and verified (`verifier`); `rerank_top_k` set: re-rank."""

    verifier: GeometricVerifier
    search: LocalSearchOptions
    rerank_top_k: int | None = None


@dataclass
class Scored:
    """A descriptor's results, the facts of how they were obtained, and the protocol's extra scores."""

    results: RetrievalResults
    info: dict = field(default_factory=dict)
    revisited: dict[str, float] | None = None
    local_features: list[LocalFeatures] | None = None  # as searched (after PCA), described images in order


def score_global(descriptors: np.ndarray, valid: np.ndarray, dataset: RetrievalDataset,
                 options: EvaluationOptions, rerank: tuple[list[LocalFeatures | None], LocalScoring] | None = None
                 ) -> Scored:
    """The `evaluation.search` over `descriptors (N, D)` (after αQE / DBA when set; optionally re-ranked by local
    features), then every metric."""
    protocol = search_protocol(dataset.query_ids, dataset.database_ids, valid)
    queries, database = select_rows(descriptors, protocol.query_ids), select_rows(descriptors, protocol.database_ids)
    if not options.expands:
        return _search_and_score(queries, database, dataset, protocol, options, rerank)
    before = _search_and_score(queries, database, dataset, protocol, options, rerank)
    queries, database = expand_for_search(queries, database, protocol.exclude, options.query_expansion,
                                          options.dba)
    scored = _search_and_score(queries, database, dataset, protocol, options, rerank)
    scored.info.update({
        "query_expansion": asdict(options.query_expansion) if options.query_expansion is not None else None,
        "dba": asdict(options.dba) if options.dba is not None else None,
        "mAP_before_expansion": metric_summary(before.results, options.ks)["mAP"],
    })
    return scored


def _search_and_score(queries: np.ndarray, database: np.ndarray, dataset: RetrievalDataset, protocol: Protocol,
                      options: EvaluationOptions,
                      rerank: tuple[list[LocalFeatures | None], LocalScoring] | None) -> Scored:
    """`evaluation.search`: exact (scored from the similarities alone, unless a re-ranking or the revisited
    protocols need the rankings) or an approximate short-list; `info["search"]` says which, and how AP is read."""
    truncated = options.search != "exact"
    if not truncated:
        info: dict = {"search": {"method": "exact", "ap_convention": FULL_RANKING_AP}}
        if rerank is None and getattr(dataset, "ground_truth", None) is None:
            batches = similarity_batches(queries, database, protocol.exclude, options.max_batch_entries)
            return Scored(evaluate_similarities(batches, dataset.labels, protocol, options.ks, options.top_k), info)
        rankings: Iterable[RankingBatch] = iter_rankings(queries, database, protocol.exclude,
                                                         options.max_batch_entries)
    else:
        parameters = approximate_parameters(options, *database.shape)
        index, device = on_gpus(build_approximate_index(database, parameters,
                                                        max_batch_entries=options.max_batch_entries),
                                min(parameters["shortlist"] + 1, database.shape[0]))
        rankings = approximate_rankings(index, queries, database, parameters["shortlist"], protocol.exclude,
                                        options.max_batch_entries)
        info = {"search": {**parameters, "device": device, "ap_convention": SHORTLIST_AP}}
    if rerank is not None:
        features, scoring = rerank
        rankings = rerank_rankings(rankings, [features[i] for i in protocol.query_ids],
                                   [features[i] for i in protocol.database_ids], scoring.verifier,
                                   scoring.rerank_top_k, scoring.search.mutual, scoring.search.ratio)
        info["rerank_top_k"] = scoring.rerank_top_k
    return _score(rankings, dataset, protocol, options, info, truncated)


def score_local(features: Sequence[LocalFeatures | None], valid: np.ndarray, dataset: RetrievalDataset,
                options: EvaluationOptions, scoring: LocalScoring, pca_dim: int | None = None) -> Scored:
    """Local search (PQ votes, then spatial verification of the shortlist), then every metric."""
    protocol = search_protocol(dataset.query_ids, dataset.database_ids, valid)
    described = np.flatnonzero(valid)
    by_record = dict(zip(described.tolist(), (features[i] for i in described), strict=True))
    if pca_dim is not None:  # DELF's PCA, learned on the database's descriptors
        reduced = reduce_dimension(list(by_record.values()), [by_record[i] for i in protocol.database_ids], pca_dim)
        by_record = dict(zip(described.tolist(), reduced, strict=True))
    database = [by_record[i] for i in protocol.database_ids]
    stacked, _ = stack_descriptors(database)
    index = build_descriptor_index(stacked, scoring.search)
    rankings = local_rankings([by_record[i] for i in protocol.query_ids], database, protocol.exclude,
                              scoring.verifier, scoring.search, index)
    info = {"local_index": index_memory(index, stacked), "shortlist": scoring.search.shortlist,
            "local_dim": int(stacked.shape[1]) if stacked.size else 0,
            "mean_keypoints": round(float(np.mean([len(f) for f in by_record.values()])), 1) if by_record else 0.0}
    scored = _score(rankings, dataset, protocol, options, info)
    scored.local_features = list(by_record.values())
    return scored


def _score(rankings: Iterable[RankingBatch], dataset: RetrievalDataset, protocol: Protocol,
           options: EvaluationOptions, info: dict, truncated: bool = False) -> Scored:
    ground_truth = getattr(dataset, "ground_truth", None)
    kept: list[RankingBatch] | None = [] if ground_truth is not None else None
    results = evaluate_rankings(_keep(rankings, kept), dataset.labels, protocol, options.ks, options.top_k,
                                truncated)
    revisited = None
    if kept is not None:
        revisited = _revisited_scores(kept, dataset, protocol, options.ks)
    return Scored(results, info, revisited)


def _keep(rankings: Iterable[RankingBatch], kept: list | None) -> Iterator[RankingBatch]:
    for batch in rankings:
        if kept is not None:
            kept.append(batch)
        yield batch


def _revisited_scores(batches: list[RankingBatch], dataset, protocol: Protocol,
                      ks: Sequence[int]) -> dict[str, float]:
    """The official protocols on the search's own ranking: rows for the described queries, database indices
    in the ground truth's `imlist` order (`dataset.database_ids` is that list)."""
    positions = np.concatenate([b.positions for b in sorted(batches, key=lambda b: b.start)])
    imlist_index = np.full(len(dataset), -1, dtype=np.int64)
    imlist_index[dataset.database_ids] = np.arange(dataset.database_ids.size)
    ranking = imlist_index[protocol.database_ids[positions]]
    query_rows = np.searchsorted(dataset.query_ids, protocol.query_ids)
    queries = [dataset.ground_truth.queries[i] for i in query_rows]
    return revisited_summary(evaluate_revisited(ranking, queries, ks))
