"""The paper's Alegoria tables shipped as resources: transcription checks and the Table 1 reproduction.

Reproduction finding (Pearson over the 39 classes of Table 3), judged against what the printed precision
explains (Table 1's 2 decimals, Table 3's 3-decimal mAPs; `_rounding_bounds`, about 0.007 per cell): the DELF
column of Table 1 is reproduced to round-off on the Scale, Illumination, Orientation, Color, Domain,
Occlusion, Time and Overall rows, and the Overall row for MAC and RMAC too (GeM's and SPoC's Overall are
0.009 and 0.010 off, just beyond it). Two things in the paper disagree with its own Table 3:
- the Positioning, Clutter, Undistinctiveness and Alterations rows differ, for DELF and the four pooled
  descriptors, by several times what rounding explains (up to 0.49), although Overall (their sum with the other
  scores) agrees: Table 1 was computed from a different split of those four scores than the one printed in
  Table 3;
- ORB and NetVLAD differ beyond rounding (0.03–0.13) on every row where DELF agrees, so their Table 1 mAPs
  were not exactly Table 3's; Table 3's own Avg column also disagrees with the mean of its seven mAPs for
  classes 1 and 32.
"""

import numpy as np
import pytest

from hetretrieval.analysis.annotations import (
    ALEGORIA_VARIATIONS,
    OVERALL_DIFFICULTY,
    PAPER_DESCRIPTORS,
    alegoria_variation_predominance,
    alegoria_variations,
    paper_table1,
    paper_table3_map,
)
from hetretrieval.analysis.correlation import correlate, correlation_matrix

# Columns typed from the paper's Table 3, independently of the resource files.
PAPER_OVERALL = (18, 14, 22, 25, 13, 11, 9, 11, 17, 26, 20, 21, 16, 18, 22, 20, 21, 18, 22, 21, 27, 24, 21, 16,
                 12, 22, 21, 12, 19, 12, 16, 11, 17, 14, 13, 17, 19, 18, 18)
PAPER_AVG = (0.210, 0.332, 0.272, 0.192, 0.180, 0.467, 0.509, 0.446, 0.288, 0.185, 0.139, 0.129, 0.237, 0.304,
             0.128, 0.294, 0.117, 0.301, 0.093, 0.239, 0.105, 0.125, 0.120, 0.151, 0.371, 0.119, 0.090, 0.237,
             0.186, 0.361, 0.169, 0.111, 0.309, 0.201, 0.178, 0.169, 0.176, 0.337, 0.187)
AVG_DISAGREES_IN_PAPER = {"1", "32"}

CONSISTENT_DELF_ROWS = ("Sc", "Il", "Or", "Co", "Do", "Oc", "Ti", OVERALL_DIFFICULTY)
CONSISTENT_OVERALL_DESCRIPTORS = ("DELF", "MAC", "RMAC")
POOLED_DESCRIPTORS = ("GeM", "MAC", "RMAC", "SPoC")
INCONSISTENT_ROWS = ("Po", "Cl", "Un", "Al")
TABLE1_ROUNDING = 0.005  # Table 1 prints r with 2 decimals
TABLE3_ROUNDING = 0.0005  # Table 3 prints each mAP with 3 decimals


def _rounding_bounds(predominance, table3, rows, columns):
    """Per cell, the largest |r - printed r| that the printed precision explains: Table 1's rounding plus, to
    first order, the effect on r of moving each of Table 3's mAPs by its rounding, `sum_i |dr/dy_i| * 0.0005`
    (dr/dy_i = (x_i - mean x) / (|x| |y|) - r (y_i - mean y) / |y|^2 over centred vectors; the predominance
    scores are integers, printed exactly). The second-order term, ~(0.0005 / |y|)^2, is below 1e-6."""
    bounds = np.zeros((len(rows), len(columns)))
    for i, row in enumerate(rows):
        x = predominance.column(row) - predominance.column(row).mean()
        for j, column in enumerate(columns):
            y = table3.column(column) - table3.column(column).mean()
            norm_x, norm_y = np.linalg.norm(x), np.linalg.norm(y)
            r = x @ y / (norm_x * norm_y)
            gradient = x / (norm_x * norm_y) - r * y / norm_y**2
            bounds[i, j] = TABLE1_ROUNDING + TABLE3_ROUNDING * np.abs(gradient).sum() + 1e-6
    return bounds


@pytest.fixture(scope="module")
def reproduced_table1():
    predominance = alegoria_variation_predominance().with_overall_difficulty()
    return correlation_matrix(correlate(predominance, paper_table3_map(), n_resamples=200))


def test_predominance_table_shape_and_class_sizes():
    predominance = alegoria_variation_predominance()
    assert predominance.scores.index == tuple(str(c) for c in range(1, 40))
    assert predominance.scores.columns == ALEGORIA_VARIATIONS
    assert predominance.class_sizes.sum() == 681  # the labelled subset (section 2.1)
    assert predominance.class_sizes.min() >= 10  # "39 classes of at least 10 images"


def test_overall_difficulty_is_the_sum_the_paper_prints():
    overall = alegoria_variation_predominance().with_overall_difficulty().column(OVERALL_DIFFICULTY)
    np.testing.assert_array_equal(overall, PAPER_OVERALL)


def test_variations_resource_matches_predominance_columns():
    variations = alegoria_variations()
    assert tuple(v.code for v in variations) == ALEGORIA_VARIATIONS
    assert all(v.name and v.definition for v in variations)


def test_table3_map_transcription_against_paper_avg_column():
    table3 = paper_table3_map()
    assert table3.columns == PAPER_DESCRIPTORS
    assert table3.index == tuple(str(c) for c in range(1, 40))
    assert ((table3.values > 0) & (table3.values < 1)).all()
    difference = np.abs(table3.values.mean(axis=1) - np.array(PAPER_AVG))
    agrees = dict(zip(table3.index, difference <= 0.001, strict=True))  # round-off of 3-decimal values
    assert {c for c, ok in agrees.items() if not ok} == AVG_DISAGREES_IN_PAPER


def test_table1_resource_layout():
    table1 = paper_table1()
    assert table1.index == (*ALEGORIA_VARIATIONS, OVERALL_DIFFICULTY)
    assert table1.columns == PAPER_DESCRIPTORS


def test_table1_reproduced_from_table3(reproduced_table1):
    paper = paper_table1()
    assert reproduced_table1.index == paper.index and reproduced_table1.columns == paper.columns
    predominance = alegoria_variation_predominance().with_overall_difficulty()
    table3 = paper_table3_map()
    for i, row in enumerate(paper.index):  # the reproduction is Pearson's r over Table 3's columns
        for j, column in enumerate(paper.columns):
            r = np.corrcoef(predominance.column(row), table3.column(column))[0, 1]
            assert reproduced_table1.values[i, j] == pytest.approx(r, abs=1e-12)

    difference = np.abs(reproduced_table1.values - paper.values)
    bound = _rounding_bounds(predominance, table3, paper.index, paper.columns)
    assert 0.0055 < bound.min() and bound.max() < 0.02
    cell = {(row, column): (difference[i, j], bound[i, j]) for i, row in enumerate(paper.index)
            for j, column in enumerate(paper.columns)}
    reproduced = [(row, "DELF") for row in CONSISTENT_DELF_ROWS]
    reproduced += [(OVERALL_DIFFICULTY, d) for d in CONSISTENT_OVERALL_DESCRIPTORS]
    for key in reproduced:  # within what rounding explains
        assert cell[key][0] <= cell[key][1], key
    for key in [(OVERALL_DIFFICULTY, "GeM"), (OVERALL_DIFFICULTY, "SPoC")]:  # just beyond it
        assert cell[key][1] < cell[key][0] <= 2 * cell[key][1], key
    for row in INCONSISTENT_ROWS:  # another split of these four scores: several times beyond rounding
        for column in ("DELF", *POOLED_DESCRIPTORS):
            assert cell[row, column][0] > 5 * cell[row, column][1], (row, column)
    for row in CONSISTENT_DELF_ROWS:  # ORB's and NetVLAD's mAPs were not Table 3's, even where DELF agrees
        for column in ("ORB", "NetVLAD"):
            assert cell[row, column][0] > 2 * cell[row, column][1], (row, column)
    worst_rows = {paper.index[i] for i in difference.argmax(axis=0)}
    assert worst_rows <= set(INCONSISTENT_ROWS) | {"Ti"}
