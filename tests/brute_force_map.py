"""An independent brute-force mAP of a saved run (`descriptors.npy` + `images.csv`), for integration tests.

Written from the definitions only, sharing no code with `hetretrieval.metrics`: every described query is
compared in float64 with every described database image but itself, positives are the database images of
its (non-empty) label, and AP is the tie-aware sum over distinct score thresholds of
`(recall_t - recall_previous) * precision_t` (sklearn's `average_precision_score`); queries without any
positive are left out of the mean.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def brute_force_map(run: Path) -> float:
    descriptors = np.load(run / "descriptors.npy").astype(np.float64)
    with (run / "images.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    described = [int(r["described"]) == 1 for r in rows]
    queries = [i for i, r in enumerate(rows) if int(r["query"]) and described[i]]
    database = [i for i, r in enumerate(rows) if int(r["database"]) and described[i]]
    average_precisions = []
    for q in queries:
        others = [i for i in database if i != q]
        relevant = np.array([rows[i]["label"] != "" and rows[i]["label"] == rows[q]["label"] for i in others])
        if not relevant.any():
            continue
        scores = descriptors[others] @ descriptors[q]
        order = np.argsort(-scores, kind="stable")
        scores, relevant = scores[order], relevant[order]
        threshold_ends = np.append(scores[1:] != scores[:-1], True)  # the last item of each distinct score
        hits = np.cumsum(relevant)[threshold_ends]
        recall, precision = hits / relevant.sum(), hits / (np.flatnonzero(threshold_ends) + 1)
        average_precisions.append(float(np.sum(np.diff(recall, prepend=0.0) * precision)))
    return float(np.mean(average_precisions))
