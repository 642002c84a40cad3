"""Variation predominance CSV loading and validation."""

import numpy as np
import pytest

from hetretrieval.analysis.annotations import OVERALL_DIFFICULTY, load_variation_predominance, load_variations
from hetretrieval.errors import DataError


def _write(tmp_path, text):
    path = tmp_path / "predominance.csv"
    path.write_text(text)
    return path


def test_load_and_overall_difficulty(tmp_path):
    loaded = load_variation_predominance(_write(tmp_path, "class,n_images,Sc,Il\na,12,3,1\nb,10,0,2\n"))
    assert loaded.scores.columns == ("Sc", "Il")
    assert loaded.class_sizes.tolist() == [12, 10]
    overall = loaded.with_overall_difficulty()
    assert overall.columns == ("Sc", "Il", OVERALL_DIFFICULTY)
    np.testing.assert_array_equal(overall.column(OVERALL_DIFFICULTY), [4, 2])


def test_class_sizes_are_optional(tmp_path):
    assert load_variation_predominance(_write(tmp_path, "class,Sc\na,0\n")).class_sizes is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("class,Sc,Il\na,3,1\nb,4,0\n", r"line 3 \(class b\): Sc = 4"),
        ("class,Sc,Il\na,1.5,1\n", r"line 2 \(class a\): Sc = 1.5"),
        ("class,Sc,Il\na,-1,1\n", "Sc = -1"),
        ("class,Sc\na,x\n", "line 2: non-numeric"),
        ("class,Sc,Il\na,1\n", "line 2: 2 fields"),
        ("id,Sc\na,1\n", "first column must be 'class'"),
        ("class,n_images\na,3\n", "no variation columns"),
        ("class,n_images,Sc\na,0,1\n", r"line 2 \(class a\): n_images = 0"),
    ],
)
def test_malformed_tables_name_the_offending_row(tmp_path, text, message):
    with pytest.raises(DataError, match=message):
        load_variation_predominance(_write(tmp_path, text))


def test_load_variations(tmp_path):
    path = tmp_path / "variations.csv"
    path.write_text('code,name,definition\nSc,Scale,"Scale change, severe"\n')
    (variation,) = load_variations(path)
    assert (variation.code, variation.name, variation.definition) == ("Sc", "Scale", "Scale change, severe")
    path.write_text("code,name\nSc,Scale\n")
    with pytest.raises(DataError, match="code, name, definition"):
        load_variations(path)
