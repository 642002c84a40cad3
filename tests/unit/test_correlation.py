"""Correlation analysis: against numpy/scipy brute force, warnings, CSV round trips, heatmap."""

import csv
import math
import warnings

import numpy as np
import pytest

from hetretrieval.analysis.correlation import (
    CorrelationWarning,
    Table,
    bootstrap_pearson_ci,
    correlate,
    correlation_matrix,
    pearson_matrix,
    plot_correlation_heatmap,
    write_correlations_csv,
)
from hetretrieval.errors import ConfigError, DataError


def _tables(n=20, seed=0):
    rng = np.random.default_rng(seed)
    classes = tuple(str(c) for c in range(n))
    scores = rng.integers(0, 4, size=(n, 3)).astype(float)
    maps = np.column_stack([0.5 - 0.1 * scores[:, 0] + 0.05 * rng.random(n), rng.random(n)])
    return (Table("class", classes, ("Sc", "Il", "Or"), scores),
            Table("class", classes, ("DELF", "GeM"), maps))


def test_pearson_matrix_matches_corrcoef_and_batches():
    rng = np.random.default_rng(1)
    x, y = rng.random((4, 15, 3)), rng.random((4, 15, 2))
    r = pearson_matrix(x, y)
    assert r.shape == (4, 3, 2)
    for b in range(4):
        full = np.corrcoef(x[b].T, y[b].T)
        np.testing.assert_allclose(r[b], full[:3, 3:], atol=1e-12)


def test_pearson_matrix_constant_column_is_nan():
    x = np.column_stack([np.ones(5), np.arange(5.0)])
    r = pearson_matrix(x, np.arange(5.0)[:, None])
    assert np.isnan(r[0, 0]) and r[1, 0] == pytest.approx(1.0)


def _pearson(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    return sxy / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def _average_ranks(values):
    """1-based ranks, tied values sharing the mean of their ranks."""
    return [sum(w < v for w in values) + (sum(w == v for w in values) + 1) / 2 for v in values]


def _two_sided_t_p_value(r, n):
    """P(|T| > |t|) for t = r sqrt((n - 2) / (1 - r^2)), T Student with nu = n - 2 degrees of freedom, by the
    closed forms of Abramowitz & Stegun 26.7.3-4: with theta = atan(|t| / sqrt(nu)), P(|T| <= |t|) is
    sin(theta) (1 + 1/2 cos^2 + 1.3/(2.4) cos^4 + ... + 1.3...(nu-3)/(2.4...(nu-2)) cos^(nu-2)) for even nu and
    2/pi (theta + sin cos (1 + 2/3 cos^2 + ... + 2.4...(nu-3)/(1.3...(nu-2)) cos^(nu-3))) for odd nu."""
    nu = n - 2
    theta = math.atan(abs(r) * math.sqrt(nu / (1 - r * r)) / math.sqrt(nu))
    c2 = math.cos(theta) ** 2
    if nu % 2 == 0:
        term, total = 1.0, 1.0
        for k in range(1, nu // 2):
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        inside = math.sin(theta) * total
    else:
        term, total = 1.0, 1.0 if nu > 1 else 0.0
        for k in range(1, (nu - 1) // 2):
            term *= (2 * k) / (2 * k + 1) * c2
            total += term
        inside = 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    return 1 - inside


def test_t_p_value_closed_forms_against_known_values():
    # r = 0.5 at n = 12 (nu = 10, t = 1.8257) and n = 11 (nu = 9, t = 1.7321): tabulated t-distribution tails
    assert _two_sided_t_p_value(0.5, 12) == pytest.approx(0.0979, abs=1e-4)
    assert _two_sided_t_p_value(0.5, 11) == pytest.approx(0.1173, abs=1e-4)
    assert _two_sided_t_p_value(0.0, 20) == pytest.approx(1.0)


@pytest.mark.parametrize("n", [20, 13])  # even and odd degrees of freedom
def test_correlate_matches_the_textbook_formulas(n):
    predominance, performance = _tables(n=n)
    results = correlate(predominance, performance, n_resamples=100)
    assert [(c.variation, c.descriptor) for c in results] == [
        (v, d) for v in predominance.columns for d in performance.columns]
    for c in results:
        x = predominance.column(c.variation).tolist()
        y = performance.column(c.descriptor).tolist()
        r, rho = _pearson(x, y), _pearson(_average_ranks(x), _average_ranks(y))
        assert c.n == n
        assert c.pearson_r == pytest.approx(r, abs=1e-12)
        assert c.pearson_p == pytest.approx(_two_sided_t_p_value(r, n), rel=1e-9, abs=1e-14)
        assert c.spearman_rho == pytest.approx(rho, abs=1e-12)
        assert c.spearman_p == pytest.approx(_two_sided_t_p_value(rho, n), rel=1e-9, abs=1e-14)
        assert c.pearson_ci_low <= c.pearson_r <= c.pearson_ci_high
    if n == 20:
        strong = next(c for c in results if (c.variation, c.descriptor) == ("Sc", "DELF"))
        assert strong.pearson_r < -0.9 and strong.pearson_p < 1e-6 and strong.pearson_ci_high < -0.8


def test_perfect_monotone_relation():
    x = np.arange(12.0)[:, None]
    classes = tuple(map(str, range(12)))
    result, = correlate(Table("class", classes, ("v",), x), Table("class", classes, ("d",), np.exp(x)),
                        n_resamples=50)
    assert result.spearman_rho == pytest.approx(1.0) and result.pearson_r < 1.0


def test_bootstrap_matches_loop_over_resamples():
    predominance, performance = _tables(n=12)
    x, y = predominance.values, performance.values
    low, high = bootstrap_pearson_ci(x, y, n_resamples=300, confidence=0.9, seed=7)
    rows = np.random.default_rng(7).integers(0, 12, size=(300, 12))
    for v in range(3):
        for d in range(2):
            rs = []
            for sample in rows:
                xs, ys = x[sample, v], y[sample, d]
                if np.ptp(xs) > 0 and np.ptp(ys) > 0:
                    rs.append(np.corrcoef(xs, ys)[0, 1])
            assert (low[v, d], high[v, d]) == pytest.approx(tuple(np.percentile(rs, [5, 95])), abs=1e-12)


def test_bootstrap_is_seeded():
    x, y = (t.values for t in _tables())
    first = bootstrap_pearson_ci(x, y, n_resamples=100, seed=3)
    np.testing.assert_array_equal(first, bootstrap_pearson_ci(x, y, n_resamples=100, seed=3))
    assert not np.array_equal(first, bootstrap_pearson_ci(x, y, n_resamples=100, seed=4))
    with pytest.raises(ConfigError):
        bootstrap_pearson_ci(x, y, n_resamples=0)


def test_classes_are_aligned_by_id():
    predominance, performance = _tables()
    shuffled = performance.select(index=performance.index[::-1])
    assert correlate(predominance, shuffled, n_resamples=50) == correlate(predominance, performance, n_resamples=50)
    partial = performance.select(index=performance.index[:15])
    with pytest.warns(CorrelationWarning, match="left out"):
        results = correlate(predominance, partial, n_resamples=50)
    assert {c.n for c in results} == {15}


def test_small_sample_warns():
    predominance, performance = _tables(n=6)
    with pytest.warns(CorrelationWarning, match="only 6 classes"):
        correlate(predominance, performance, n_resamples=50)
    with pytest.raises(DataError):
        correlate(predominance.select(index=("0", "1")), performance, n_resamples=50)


def test_constant_column_gives_nan_and_warns():
    predominance, performance = _tables()
    values = np.array(predominance.values)
    values[:, 1] = 2.0
    constant = Table("class", predominance.index, predominance.columns, values)
    with pytest.warns(CorrelationWarning, match="constant columns .*: Il"):
        results = correlate(constant, performance, n_resamples=50)
    for c in results:
        undefined = [c.pearson_r, c.pearson_p, c.pearson_ci_low, c.pearson_ci_high, c.spearman_rho, c.spearman_p]
        assert np.isnan(undefined).all() == (c.variation == "Il")


def test_matrix_and_csv_writers(tmp_path):
    predominance, performance = _tables()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results = correlate(predominance, performance, n_resamples=50)
    matrix = correlation_matrix(results, "spearman_rho")
    assert matrix.index == predominance.columns and matrix.columns == performance.columns
    assert matrix.values[2, 1] == results[5].spearman_rho
    with pytest.raises(ConfigError):
        correlation_matrix(results, "kendall_tau")

    back = Table.read_csv(matrix.write_csv(tmp_path / "matrix.csv"))
    assert back.index_name == "variation" and back.index == matrix.index
    np.testing.assert_allclose(back.values, matrix.values, atol=1e-6)

    with write_correlations_csv(results, tmp_path / "tidy.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["variation", "descriptor", "n", "pearson_r", "pearson_p", "pearson_ci_low",
                             "pearson_ci_high", "spearman_rho", "spearman_p"]
    assert len(rows) == 6 and float(rows[0]["pearson_r"]) == pytest.approx(results[0].pearson_r, abs=1e-6)


def test_table_read_csv_errors(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("class,DELF\n1,0.5\n2,oops\n")
    with pytest.raises(DataError, match="line 3"):
        Table.read_csv(path)
    path.write_text("class,DELF\n1,0.5\n1,0.4\n")
    with pytest.raises(DataError, match="duplicate"):
        Table.read_csv(path)
    with pytest.raises(DataError, match="not found"):
        Table.read_csv(tmp_path / "missing.csv")
    with pytest.raises(ConfigError):
        Table("class", ("1",), ("a", "b"), np.zeros((1, 3)))


def test_heatmap_png(tmp_path):
    predominance, performance = _tables()
    matrix = correlation_matrix(correlate(predominance, performance, n_resamples=50))
    path = plot_correlation_heatmap(matrix, tmp_path / "fig" / "heatmap.png", title="r")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


@pytest.mark.parametrize("columns", [("gem", "mac"), ("max_size=128,limit_predict_batches=1.0", "b")])
def test_heatmap_cuts_off_no_title_or_label(tmp_path, columns):
    """Long run names and a title wider than the cells: the layout fits them (no warning), nothing at the edge."""
    from PIL import Image

    table = Table("variation", ("ageing", "off_centre_crop", "overall"), columns, [[0.1, -0.9], [0.5, np.nan],
                                                                                   [-0.3, 0.2]])
    title = "Pearson r between per-class mAP and variation predominance"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "constrained_layout not applied because axes sizes collapsed"
        path = plot_correlation_heatmap(table, tmp_path / "heatmap.png", title=title)
    pixels = np.asarray(Image.open(path).convert("L"))
    border = np.concatenate([pixels[:3].ravel(), pixels[-3:].ravel(), pixels[:, :3].ravel(), pixels[:, -3:].ravel()])
    assert border.min() == 255  # every title, label and cell is inside the picture
    assert (pixels[:40] < 128).any()  # the title is drawn, at the top
