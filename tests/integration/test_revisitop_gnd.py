"""Real revisited Oxford/Paris ground truth: safe loading, and the E/M/H metrics against the official loop."""

import pickle

import numpy as np
import pytest

from hetretrieval.data.revisitop import load_revisitop
from hetretrieval.errors import DataError
from hetretrieval.metrics.revisited import evaluate_revisited

DATASETS = {"roxford5k": 4993, "rparis6k": 6322}


def reference_compute_ap(ranks, nres):
    """Transcription of the official revisitop `compute_ap` (trapezoids over 0-based positive ranks)."""
    ap = 0.0
    recall_step = 1.0 / nres
    for j, rank in enumerate(ranks):
        precision_0 = 1.0 if rank == 0 else float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def reference_compute_map(ranks, gnd, kappas):
    """Transcription of the official revisitop `compute_map`; `ranks` is `(n_db, n_queries)` as there."""
    nq = len(gnd)
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    nempty = 0
    for i in range(nq):
        qgnd = np.asarray(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            aps[i] = np.nan
            prs[i, :] = np.nan
            nempty += 1
            continue
        qgndj = np.asarray(gnd[i]["junk"])
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k = 0
        ij = 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        aps[i] = reference_compute_ap(pos, len(qgnd))
        pos += 1
        for j, kappa in enumerate(kappas):
            kq = min(max(pos), kappa)
            prs[i, j] = (pos <= kq).sum() / kq
    n_evaluated = nq - nempty
    return np.nansum(aps) / n_evaluated, aps, np.nansum(prs, axis=0) / n_evaluated, prs


def reference_protocols(ground_truth):
    """The official example's per-protocol `ok`/`junk` lists."""
    easy = [{"ok": q.easy, "junk": np.concatenate([q.junk, q.hard])} for q in ground_truth.queries]
    medium = [{"ok": np.concatenate([q.easy, q.hard]), "junk": q.junk} for q in ground_truth.queries]
    hard = [{"ok": q.hard, "junk": np.concatenate([q.junk, q.easy])} for q in ground_truth.queries]
    return {"easy": easy, "medium": medium, "hard": hard}


@pytest.fixture(scope="module", params=sorted(DATASETS))
def ground_truth(request, revisitop_root):
    return load_revisitop(revisitop_root, request.param)


def _perfect(gt, n_db):
    rows = []
    for q in gt.queries:
        first = np.concatenate([q.easy, q.hard])
        rows.append(np.concatenate([first, np.setdiff1d(np.arange(n_db), first)]))
    return np.stack(rows)


def _junk_interleaved(gt, n_db):
    """Each positive preceded by a junk image while junk lasts, then everything else."""
    rows = []
    for q in gt.queries:
        positives = np.concatenate([q.easy, q.hard])
        junk = q.junk[: len(positives)]
        head = np.empty(len(positives) + len(junk), dtype=np.int64)
        head[: 2 * len(junk) : 2] = junk
        head[1 : 2 * len(junk) : 2] = positives[: len(junk)]
        head[2 * len(junk) :] = positives[len(junk) :]
        rows.append(np.concatenate([head, np.setdiff1d(np.arange(n_db), head)]))
    return np.stack(rows)


def _rankings(gt):
    n_db = len(gt.imlist)
    rng = np.random.default_rng(0)
    perfect = _perfect(gt, n_db)
    return {
        "perfect": perfect,
        "reversed": perfect[:, ::-1].copy(),
        "random": np.stack([rng.permutation(n_db) for _ in gt.queries]),
        "junk_interleaved": _junk_interleaved(gt, n_db),
        "random_top_100": np.stack([rng.permutation(n_db)[:100] for _ in gt.queries]),
    }


def test_ground_truth_structure(ground_truth):
    assert len(ground_truth.imlist) == DATASETS[ground_truth.name]
    assert len(ground_truth.qimlist) == len(ground_truth.queries) == 70
    for query in ground_truth.queries:
        x1, y1, x2, y2 = query.bbx
        assert x2 > x1 and y2 > y1
        assert len(query.easy) + len(query.hard) > 0
        assert not set(query.easy) & set(query.hard)
        assert not query.easy.flags.writeable


@pytest.mark.parametrize("kind", ["perfect", "reversed", "random", "junk_interleaved", "random_top_100"])
def test_protocols_match_official_loop(ground_truth, kind):
    ranking = _rankings(ground_truth)[kind]
    ks = (1, 5, 10)
    ours = evaluate_revisited(ranking, ground_truth.queries, ks=ks)
    for protocol, gnd in reference_protocols(ground_truth).items():
        if kind == "random_top_100":  # the official loop cannot take a query with no positive retrieved
            kept = [i for i, g in enumerate(gnd) if np.isin(ranking[i], g["ok"]).any() or len(g["ok"]) == 0]
            assert len(kept) < len(gnd)
            ranking_kept, gnd = ranking[kept], [gnd[i] for i in kept]
            scores = evaluate_revisited(ranking_kept, [ground_truth.queries[i] for i in kept], ks=ks)[protocol]
        else:
            ranking_kept, scores = ranking, ours[protocol]
        ref_map, ref_aps, ref_pr, ref_prs = reference_compute_map(ranking_kept.T, gnd, ks)
        np.testing.assert_allclose(scores.average_precision, ref_aps, atol=1e-6, equal_nan=True)
        np.testing.assert_allclose(scores.precision_at_k, ref_prs, atol=1e-6, equal_nan=True)
        assert scores.mean_average_precision == pytest.approx(ref_map, abs=1e-6)
        np.testing.assert_allclose(list(scores.mean_precision_at_k.values()), ref_pr, atol=1e-6)
    if kind in ("perfect", "junk_interleaved"):
        assert all(s.mean_average_precision == pytest.approx(1.0) for s in ours.values())


def test_easy_protocol_excludes_queries_without_easy_images(ground_truth):
    easy = evaluate_revisited(_rankings(ground_truth)["random"], ground_truth.queries)["easy"]
    n_without_easy = sum(len(q.easy) == 0 for q in ground_truth.queries)
    assert np.isnan(easy.average_precision).sum() == n_without_easy


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickles_with_foreign_globals_are_refused(tmp_path):
    (tmp_path / "gnd_roxford5k.pkl").write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [_Evil()]}))
    with pytest.raises(DataError, match="not allowed"):
        load_revisitop(tmp_path, "roxford5k")


def test_numpy_array_ground_truth_loads(tmp_path):
    gnd = [{"bbx": np.array([1.0, 2.0, 30.0, 40.0]), "easy": np.array([2, 0]), "hard": np.array([], dtype=int),
            "junk": np.array([1])}]
    payload = {"imlist": ["a", "b", "c"], "qimlist": ["q"], "gnd": gnd}
    (tmp_path / "gnd_rparis6k.pkl").write_bytes(pickle.dumps(payload))
    gt = load_revisitop(tmp_path, "rparis6k")
    assert gt.queries[0].easy.tolist() == [0, 2]
    assert gt.queries[0].bbx == (1.0, 2.0, 30.0, 40.0)
