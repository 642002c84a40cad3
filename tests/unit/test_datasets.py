"""Dataset builders: layouts, metadata, splits, distractors and start-up errors."""

import numpy as np
import pytest
from PIL import Image

from hetretrieval.data.datasets import csv_manifest, domain_folder, labelled_folder
from hetretrieval.errors import ConfigError, DataError


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(path)


@pytest.fixture
def pacs_like(tmp_path):
    for domain in ("photo", "sketch"):
        for label in ("dog", "horse"):
            for i in range(2):
                _image(tmp_path / domain / label / f"{i}.png")
    return tmp_path


def test_labelled_folder_with_distractors(tmp_path):
    for label in ("a", "b"):
        _image(tmp_path / "data" / label / "1.jpg")
    _image(tmp_path / "extra" / "x.jpg")
    dataset = labelled_folder(tmp_path / "data", distractors=tmp_path / "extra")
    assert dataset.labels == ["a", "b", None]
    assert list(dataset.query_ids) == [0, 1] and list(dataset.database_ids) == [0, 1, 2]


def test_domain_folder_keeps_domain_and_splits(pacs_like):
    dataset = domain_folder(pacs_like, query={"domain": ["sketch"]}, database={"domain": ["photo"]})
    assert {dataset.records[i].metadata["domain"] for i in dataset.query_ids} == {"sketch"}
    assert {dataset.records[i].metadata["domain"] for i in dataset.database_ids} == {"photo"}
    with pytest.raises(ConfigError, match="domains"):
        domain_folder(pacs_like, domains=["painting"])
    with pytest.raises(ConfigError, match="unknown field"):
        domain_folder(pacs_like, query={"domian": ["sketch"]})


def test_csv_manifest_metadata_and_errors(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        _image(tmp_path / name)
    manifest = tmp_path / "labels.csv"
    manifest.write_text("filename,landmark,color\na.png,arc,sepia\nb.png,arc,color\nc.png,,gray\n")
    dataset = csv_manifest(manifest, label_column="landmark")
    assert dataset.labels == ["arc", "arc", None]
    assert dataset.records[0].metadata == {"color": "sepia"}
    assert list(dataset.query_ids) == [0, 1]

    manifest.write_text("filename,landmark\na.png,arc\nmissing.png,arc\n")
    with pytest.raises(DataError, match="missing.png"):
        csv_manifest(manifest, label_column="landmark")
    with pytest.raises(DataError, match="no column 'label'"):
        csv_manifest(manifest)


def test_missing_root_and_empty_dataset(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        labelled_folder(tmp_path / "nowhere")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        labelled_folder(tmp_path / "empty")


def test_query_ids_are_int_arrays(pacs_like):
    dataset = domain_folder(pacs_like)
    assert dataset.query_ids.dtype == np.int64 and len(dataset) == 8
