"""Image-level analysis: mAP broken down by an image tag, query tag × database tag (e.g. PACS domains).

Each cell re-ranks a saved run's descriptors with its queries restricted to one tag value and its database to
another, through the same `evaluate_retrieval` as the evaluation: no image is re-described.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hetretrieval.analysis.correlation import Table
from hetretrieval.analysis.results import load_images
from hetretrieval.errors import ConfigError, DataError
from hetretrieval.metrics.retrieval import evaluate_retrieval

ANY_TAG = "all"


@dataclass(frozen=True)
class TagBreakdown:
    """Query tag × database tag tables of mAP and of evaluated queries; the last column is the whole database."""

    tag: str
    mean_average_precision: Table
    n_queries: Table


def tag_breakdown(directory: str | Path, tag: str, max_batch_entries: int = 1 << 24) -> TagBreakdown:
    """mAP of a saved run for every (query tag value, database tag value) pair, plus the unrestricted database.

    The run's own protocol is kept: queries are among its queries, database images among its database. A query is never matched against itself (same-value cells are leave-one-out); cells without a query that
    has a positive in the restricted database are NaN.
    """
    directory = Path(directory)
    images = load_images(directory)
    queries = [r for r, is_query in zip(images.records, images.query, strict=True) if is_query]
    values = sorted({r.metadata.get(tag) for r in queries} - {None})
    if not values:
        known = sorted({k for r in images.records for k in r.metadata})
        raise ConfigError(f"no query image of '{directory}' has the tag '{tag}'; tags: {known}")
    database_values = sorted({r.metadata.get(tag) for r in images.records} - {None})
    descriptors = np.load(directory / "descriptors.npy")
    if len(descriptors) != len(images.records):
        raise DataError(f"'{directory}': descriptors.npy has {len(descriptors)} rows for {len(images.records)} images")
    columns = (*database_values, ANY_TAG)
    tags = np.array([r.metadata.get(tag) for r in images.records], dtype=object)
    labels = [r.label for r in images.records]
    labelled = np.array([label is not None for label in labels])
    mean_ap = np.full((len(values), len(columns)), np.nan)
    counts = np.zeros((len(values), len(columns)))
    for row, query_value in enumerate(values):
        query_ids = np.flatnonzero(images.query & labelled & (tags == query_value))
        for column, database_value in enumerate(columns):
            in_database = images.database & ((tags == database_value) if database_value != ANY_TAG else True)
            if not in_database.any():
                continue
            results = evaluate_retrieval(descriptors, labels, query_ids, np.flatnonzero(in_database),
                                         images.described, ks=(1,), top_k=1, max_batch_entries=max_batch_entries)
            mean_ap[row, column] = results.mean_average_precision
            counts[row, column] = int(results.evaluated.sum())
    index_name = f"query {tag}"
    return TagBreakdown(tag, Table(index_name, tuple(values), columns, mean_ap),
                        Table(index_name, tuple(values), columns, counts))
