"""Scripted mutation run: single-line mutants of the reference-critical code, each run against its tests.

Each mutant replaces one exact fragment of one line of `src/hetretrieval/...` (the fragment must occur exactly
once in the file) and runs the unit tests that cover that module; a mutant is *killed* when those tests fail.
Mutants are applied to a private copy of `src/`, `tests/`, `conf/` and `pyproject.toml` (in a temporary
folder, imported first through `PYTHONPATH`), never to the working tree, and every file is restored in a
`finally` before the next mutant. The unmutated copy must pass every subset first.

    .venv/bin/python benchmarks/mutation_check.py            # every mutant; exit 1 below --min-kill
    .venv/bin/python benchmarks/mutation_check.py --list     # the mutants, no run
    .venv/bin/python benchmarks/mutation_check.py --only rmac_starts_round gem_root

`EQUIVALENT` names the mutants that cannot be killed, with the reason each is equivalent to the original.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path("src/hetretrieval")

POOLING_TESTS = ("tests/unit/test_pooling.py",)
NETVLAD_TESTS = ("tests/unit/test_netvlad.py",)
ATTENTION_TESTS = ("tests/unit/test_attention.py",)
AP_TESTS = ("tests/unit/test_ap.py", "tests/unit/test_retrieval_metrics.py")
REVISITED_TESTS = ("tests/unit/test_revisited.py",)
LOSS_TESTS = ("tests/unit/test_losses.py",)


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to src/hetretrieval
    original: str  # an exact fragment of one line, unique in the file
    mutated: str
    tests: tuple[str, ...]


MUTANTS = [
    # --- models/pooling/functional.py ---------------------------------------------------------------------
    Mutant("l2n_dim", "models/pooling/functional.py", "x / x.norm(dim=-1, keepdim=True)",
           "x / x.norm(dim=0, keepdim=True)", POOLING_TESTS),
    Mutant("mac_min", "models/pooling/functional.py", "return x.amax(dim=(-2, -1))",
           "return x.amin(dim=(-2, -1))", POOLING_TESTS),
    Mutant("spoc_sum", "models/pooling/functional.py", "return x.mean(dim=(-2, -1))",
           "return x.sum(dim=(-2, -1))", POOLING_TESTS),
    Mutant("gem_root", "models/pooling/functional.py", ".mean(dim=(-2, -1)).pow(1.0 / p)",
           ".mean(dim=(-2, -1)).pow(1.0 / (p + 1))", POOLING_TESTS),
    Mutant("gem_no_clamp", "models/pooling/functional.py", "return x.clamp(min=eps).pow(p)",
           "return x.clamp(min=0.0).pow(p)", POOLING_TESTS),
    Mutant("rmac_side", "models/pooling/functional.py", "side = 2 * short // (level + 1)",
           "side = 2 * short // (level + 2)", POOLING_TESTS),
    Mutant("rmac_axis", "models/pooling/functional.py", "if height > width else (0, extra)",
           "if height < width else (0, extra)", POOLING_TESTS),
    Mutant("rmac_skip_side", "models/pooling/functional.py", "if side < 1:", "if side < 2:", POOLING_TESTS),
    Mutant("rmac_extra_range", "models/pooling/functional.py", "for n in range(2, 8)]", "for n in range(2, 7)]",
           POOLING_TESTS),
    Mutant("rmac_tie_last", "models/pooling/functional.py", "return errors.index(min(errors)) + 1",
           "return len(errors) - errors[::-1].index(min(errors))", POOLING_TESTS),
    Mutant("rmac_starts_round", "models/pooling/functional.py",
           "return [i * (length - side) // (count - 1) for i in range(count)]",
           "return [round(i * (length - side) / (count - 1)) for i in range(count)]", POOLING_TESTS),
    Mutant("rmac_starts_float", "models/pooling/functional.py",
           "return [i * (length - side) // (count - 1) for i in range(count)]",
           "return [int(i * ((length - side) / (count - 1))) for i in range(count)]", POOLING_TESTS),
    Mutant("rmac_region_norm", "models/pooling/functional.py", "total = total + l2n(mac(",
           "total = total + (mac(", POOLING_TESTS),
    Mutant("scales_no_inner_norm", "models/pooling/functional.py",
           "return l2n(torch.stack([l2n(d) for d in descriptors]).mean(dim=0))",
           "return l2n(torch.stack(descriptors).mean(dim=0))", POOLING_TESTS),
    Mutant("resize_floor", "models/pooling/functional.py", "size = (max(1, round(images.shape[-2] * scale))",
           "size = (max(1, int(images.shape[-2] * scale))", POOLING_TESTS),
    # --- models/pooling/heads.py, netvlad.py --------------------------------------------------------------
    Mutant("gem_head_p0", "models/pooling/heads.py", "if p <= 0 or eps <= 0:", "if p < 0 or eps <= 0:",
           POOLING_TESTS),
    Mutant("rmac_head_overlap", "models/pooling/heads.py", "return PF.rmac(x, self.levels, self.overlap)",
           "return PF.rmac(x, self.levels)", POOLING_TESTS),
    Mutant("netvlad_softmax_dim", "models/pooling/netvlad.py", "assignment = logits.softmax(dim=1)",
           "assignment = logits.softmax(dim=2)", NETVLAD_TESTS),
    Mutant("netvlad_residual_sign", "models/pooling/netvlad.py",
           "- assignment.sum(2, keepdim=True) * centroids", "+ assignment.sum(2, keepdim=True) * centroids",
           NETVLAD_TESTS),
    Mutant("netvlad_intra_norm", "models/pooling/netvlad.py", "F.normalize(residuals, dim=2).flatten(1)",
           "residuals.flatten(1)", NETVLAD_TESTS),
    Mutant("netvlad_alpha", "models/pooling/netvlad.py", "alpha = math.log(ratio) /", "alpha = math.log2(ratio) /",
           NETVLAD_TESTS),
    Mutant("netvlad_weight", "models/pooling/netvlad.py", "return 2 * alpha * centroids,",
           "return alpha * centroids,", NETVLAD_TESTS),
    # --- models/local/attention.py -----------------------------------------------------------------------
    Mutant("attention_sigmoid", "models/local/attention.py", "nn.Softplus(),", "nn.Sigmoid(),", ATTENTION_TESTS),
    Mutant("attention_leaky", "models/local/attention.py", "nn.ReLU(inplace=True),", "nn.LeakyReLU(0.01),",
           ATTENTION_TESTS),
    Mutant("attention_pool_size", "models/local/attention.py", "scores) / scores[0].numel()",
           "scores) / scores.numel()", ATTENTION_TESTS),
    Mutant("attention_pool_unnormalised", "models/local/attention.py",
           'torch.einsum("bchw,bhw->bc", F.normalize(features, dim=1), scores)',
           'torch.einsum("bchw,bhw->bc", features, scores)', ATTENTION_TESTS),
    Mutant("feature_norm_l1", "models/local/attention.py", "torch.linalg.vector_norm(features, dim=1)",
           "torch.linalg.vector_norm(features, ord=1, dim=1)", ATTENTION_TESTS),
    # --- metrics/ap.py, retrieval.py ----------------------------------------------------------------------
    Mutant("ap_ties_ignored", "metrics/ap.py", "group_end[:, :-1] = scores[:, :-1] != scores[:, 1:]",
           "group_end[:, :-1] = True", AP_TESTS),
    Mutant("ap_precision_rank", "metrics/ap.py", "precision = hits / np.arange(1, n_items + 1)",
           "precision = hits / np.arange(2, n_items + 2)", AP_TESTS),
    Mutant("ap_group_credit", "metrics/ap.py", "(hits - hits_before_group) * precision",
           "(hits - hits_before_group) * precision ** 2", AP_TESTS),
    Mutant("precision_k_short", "metrics/ap.py", "return np.asarray(relevance[:, :k], dtype=bool).sum(axis=1) / k",
           "return np.asarray(relevance[:, :k], dtype=bool).mean(axis=1)", AP_TESTS),
    Mutant("recall_k_floor", "metrics/ap.py", "found / np.maximum(n_positives, 1)", "found / np.maximum(n_positives, 2)",
           AP_TESTS),
    Mutant("group_mean_nan", "metrics/ap.py", "finite = np.isfinite(values)",
           "finite = ~np.isnan(values) | np.isnan(values)", AP_TESTS),
    Mutant("ap_positives_ties", "metrics/ap.py", 'np.searchsorted(sorted_scores[row], thresholds, side="left")',
           'np.searchsorted(sorted_scores[row], thresholds, side="right")', AP_TESTS),
    Mutant("dropped_entries_count", "metrics/retrieval.py",
           "(query_codes >= 0) & np.isfinite(scores)", "(query_codes >= 0)", AP_TESTS),
    Mutant("unlabelled_class_zero", "metrics/retrieval.py",
           "names[label] if label is not None else -1", "names[label] if label is not None else 0", AP_TESTS),
    Mutant("class_map_empty", "metrics/retrieval.py", "values = [m for n, m in self.per_class.values() if n > 0]",
           "values = [m for n, m in self.per_class.values()]", AP_TESTS),
    Mutant("unlabelled_query_positives", "metrics/retrieval.py", "== query_codes) & (query_codes >= 0)",
           "== query_codes) & (query_codes >= -1)", AP_TESTS),
    Mutant("self_not_excluded", "metrics/retrieval.py", "position_in_database[database_ids] = np.arange(",
           "position_in_database[database_ids] = -1 + 0 * np.arange(", AP_TESTS),
    # --- metrics/revisited.py -----------------------------------------------------------------------------
    Mutant("easy_keeps_hard", "metrics/revisited.py", "return easy, junk | hard", "return easy, junk", REVISITED_TESTS),
    Mutant("hard_keeps_easy", "metrics/revisited.py", "return hard, junk | easy", "return hard, junk",
           REVISITED_TESTS),
    Mutant("junk_counted", "metrics/revisited.py", "return query, position - junk_before[query, position]",
           "return query, position", REVISITED_TESTS),
    Mutant("junk_before_inclusive", "metrics/revisited.py",
           "junk_before = np.cumsum(is_junk, axis=1, dtype=np.int32) - is_junk",
           "junk_before = np.cumsum(is_junk, axis=1, dtype=np.int32)", REVISITED_TESTS),
    Mutant("trapezoid_first", "metrics/revisited.py", "out=np.ones(len(rank)), where=rank > 0)",
           "out=np.zeros(len(rank)), where=rank > 0)", REVISITED_TESTS),
    Mutant("trapezoid_right", "metrics/revisited.py", "precision_at = (found_before + 1) / (rank + 1)",
           "precision_at = (found_before + 1) / (rank + 2)", REVISITED_TESTS),
    Mutant("precision_cap", "metrics/revisited.py", "caps = np.minimum(last[:, None], np.asarray(ks)[None, :])",
           "caps = np.asarray(ks)[None, :] + 0 * last[:, None]", REVISITED_TESTS),
    # --- training/losses.py -------------------------------------------------------------------------------
    Mutant("contrastive_positive_half", "training/losses.py", "positive_losses = 0.5 * (",
           "positive_losses = 1.0 * (", LOSS_TESTS),
    Mutant("contrastive_negative_power", "training/losses.py", "F.relu(margin - negative_distances).pow(2)",
           "F.relu(margin - negative_distances).pow(1)", LOSS_TESTS),
    Mutant("contrastive_reduction", "training/losses.py", 'return losses.mean() if reduction == "mean" else',
           'return losses.sum() if reduction == "mean" else', LOSS_TESTS),
    Mutant("tuple_negatives", "training/losses.py", "negatives = queries + 2 + torch.arange(",
           "negatives = queries + 1 + torch.arange(", LOSS_TESTS),
    Mutant("pairs_not_unique", "training/losses.py", "pos_anchors, pos = torch.stack([anchors, positives]).unique(dim=1)",
           "pos_anchors, pos = torch.stack([anchors, positives])", LOSS_TESTS),
    Mutant("self_pairs", "training/losses.py", "torch.triu_indices(len(labels), len(labels), offset=1,",
           "torch.triu_indices(len(labels), len(labels), offset=0,", LOSS_TESTS),
    Mutant("triplet_power", "training/losses.py", "power=2 if squared else 1", "power=1 if squared else 2",
           LOSS_TESTS),
    Mutant("zero_loss_detached", "training/losses.py", "return embeddings.sum() * 0",
           "return torch.zeros((), device=embeddings.device)", LOSS_TESTS),
    Mutant("distance_clamp", "training/losses.py", "_MIN_SQUARED_DISTANCE = 1e-12", "_MIN_SQUARED_DISTANCE = 1e-4",
           LOSS_TESTS),
]

# Mutants that no test can kill, each with the reason it computes the same as the original.
EQUIVALENT: dict[str, str] = {}


def _copy_tree(destination: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in ("src", "tests", "conf"):
        shutil.copytree(ROOT / name, destination / name, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", destination / "pyproject.toml")


def _run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, float]:
    env = {**os.environ, "PYTHONPATH": str(copy / "src"), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                               *tests], cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        code = done.returncode
    except subprocess.TimeoutExpired:
        code = -1  # a hang counts as killed (the tests did not pass)
    return code, time.perf_counter() - start


def _apply(path: Path, mutant: Mutant) -> str:
    source = path.read_text()
    if source.count(mutant.original) != 1:
        raise SystemExit(f"mutant {mutant.name}: the fragment occurs {source.count(mutant.original)} times in "
                         f"{mutant.path} (the source changed: update the mutant)")
    start = source.index(mutant.original)
    line_end = source.find("\n", start)
    if "\n" in mutant.original or (line_end != -1 and start + len(mutant.original) > line_end):
        raise SystemExit(f"mutant {mutant.name}: not a single-line fragment")
    path.write_text(source.replace(mutant.original, mutant.mutated))
    return source


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--min-kill", type=float, default=0.95, help="fail below this fraction killed")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per test run")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    if len({m.name for m in MUTANTS}) != len(MUTANTS):
        raise SystemExit("mutant names must be unique")
    if args.list:
        for m in mutants:
            found = (ROOT / PACKAGE / m.path).read_text().count(m.original)
            print(f"{m.name:28s} {m.path}: {m.original!r} -> {m.mutated!r}" + ("" if found == 1 else
                                                                              f"  [found {found} times]"))
        return 0

    with tempfile.TemporaryDirectory(prefix="mutation-") as folder:
        copy = Path(folder)
        _copy_tree(copy)
        for tests in sorted({m.tests for m in mutants}):
            code, seconds = _run_tests(copy, tests, args.timeout)
            if code != 0:
                print(f"the unmutated code fails {' '.join(tests)} (exit {code}): fix that first")
                return 2
            print(f"baseline passes {' '.join(tests)} ({seconds:.0f} s)", flush=True)
        survivors = []
        for mutant in mutants:
            path = copy / PACKAGE / mutant.path
            original = _apply(path, mutant)
            try:
                code, seconds = _run_tests(copy, mutant.tests, args.timeout)
            finally:
                path.write_text(original)
            killed = code != 0
            if not killed:
                survivors.append(mutant)
            print(f"{'killed  ' if killed else 'SURVIVED'} {mutant.name:28s} (exit {code}, {seconds:.0f} s)", flush=True)

    killed = len(mutants) - len(survivors)
    print(f"\n{killed}/{len(mutants)} mutants killed ({killed / len(mutants):.1%})")
    for mutant in survivors:
        reason = EQUIVALENT.get(mutant.name, "NOT KNOWN TO BE EQUIVALENT: add a test that kills it")
        print(f"  survivor {mutant.name}: {reason}")
    return 0 if killed / len(mutants) >= args.min_kill else 1


if __name__ == "__main__":
    sys.exit(main())
