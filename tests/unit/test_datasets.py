"""Dataset builders: layouts, metadata, splits, distractors, start-up errors and real folders' oddities."""

import logging

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


def test_labelled_folder_labels_by_class_folder_and_skips_hidden(tmp_path):
    for name in ("dog/a.jpg", "dog/puppies/x.jpg", "dog/.hidden.jpg", "horse/b.jpg",
                 "horse/.thumbnails/y.jpg", ".ipynb_checkpoints/c.jpg", "loose.jpg"):
        _image(tmp_path / name)
    dataset = labelled_folder(tmp_path)
    assert [(r.path.relative_to(tmp_path).as_posix(), r.label) for r in dataset.records] == [
        ("dog/a.jpg", "dog"), ("dog/puppies/x.jpg", "dog"), ("horse/b.jpg", "horse")]


def test_folder_links_are_not_followed(tmp_path, caplog):
    root = tmp_path / "data"
    for name in ("a/1.jpg", "b/2.jpg"):
        _image(root / name)
    (root / "loop").symlink_to(root)
    (root / "a" / "again.jpg").symlink_to(root / "b" / "2.jpg")
    (root / "a" / "gone.jpg").symlink_to(root / "a" / "deleted.jpg")
    (tmp_path / "extra" / "sub").mkdir(parents=True)
    _image(tmp_path / "extra" / "x.jpg")
    (tmp_path / "extra" / "sub" / "up").symlink_to(tmp_path / "extra")
    _image(tmp_path / "extra" / ".cache" / "x.jpg")
    with caplog.at_level(logging.WARNING):
        dataset = labelled_folder(root, distractors=tmp_path / "extra")
    assert [(r.path.relative_to(tmp_path).as_posix(), r.label) for r in dataset.records] == [
        ("data/a/1.jpg", "a"), ("data/b/2.jpg", "b"), ("extra/x.jpg", None)]  # the file itself, not its link
    assert f"not following 1 folder link(s) under {root}: {root / 'loop'}" in caplog.text
    assert f"{root / 'a' / 'again.jpg'} (= {root / 'b' / '2.jpg'})" in caplog.text
    assert f"dangling link(s) under {root}: {root / 'a' / 'gone.jpg'}" in caplog.text
    assert str(tmp_path / "extra" / "sub" / "up") in caplog.text


def test_domain_folder_skips_hidden_and_linked_folders(pacs_like, caplog):
    _image(pacs_like / "photo" / "dog" / "nested" / "n.png")
    _image(pacs_like / "photo" / ".ipynb_checkpoints" / "c.png")
    _image(pacs_like / ".trash" / "dog" / "t.png")
    (pacs_like / "photo_copy").symlink_to(pacs_like / "photo")
    dataset = domain_folder(pacs_like)
    assert {r.metadata["domain"] for r in dataset.records} == {"photo", "sketch"} and len(dataset) == 9
    nested = next(r for r in dataset.records if r.path.name == "n.png")
    assert (nested.label, nested.metadata) == ("dog", {"domain": "photo"})
    with pytest.raises(ConfigError, match="not found"):
        domain_folder(pacs_like, domains=["photo_copy"])


def _manifest(tmp_path, text, *names):
    for name in names:
        _image(tmp_path / name)
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


def test_csv_manifest_refuses_a_file_with_two_labels(tmp_path):
    manifest = _manifest(tmp_path, "filename,label\na.png,cat\nb.png,cat\n./a.png,dog\n", "a.png", "b.png")
    with pytest.raises(DataError, match=r"'./a.png' two labels: 'cat' on line 2, 'dog' on line 4") as error:
        csv_manifest(manifest)
    assert "\n" not in str(error.value)
    manifest.write_text("filename,label,color\na.png,cat,sepia\na.png,cat,gray\n")
    with pytest.raises(DataError, match="two sets of metadata.*line 2.*line 3"):
        csv_manifest(manifest)


def test_csv_manifest_drops_repeated_rows(tmp_path, caplog):
    manifest = _manifest(tmp_path, "filename,label\na.png,cat\nb.png,cat\na.png,cat\n", "a.png", "b.png")
    with caplog.at_level(logging.WARNING):
        dataset = csv_manifest(manifest)
    assert [r.path.name for r in dataset.records] == ["a.png", "b.png"]
    assert "1 repeated row(s) dropped: a.png (lines 2 and 4)" in caplog.text


def test_csv_manifest_missing_value_labels_are_distractors(tmp_path, caplog):
    names = [f"{i}.png" for i in range(8)]
    labels = ["cat", "cat", "NA", "nan", "None", "NULL", "n/a", ""]
    text = "filename,label\n" + "".join(f"{n},{label}\n" for n, label in zip(names, labels, strict=True))
    with caplog.at_level(logging.WARNING):
        dataset = csv_manifest(_manifest(tmp_path, text, *names))
    assert dataset.labels == ["cat", "cat", None, None, None, None, None, None]
    (message,) = [r.getMessage() for r in caplog.records if "missing value" in r.getMessage()]
    assert "5 label(s)" in message
    assert all(f"'{spelling}' (1)" in message for spelling in ("NA", "nan", "None", "NULL", "n/a"))


def test_csv_manifest_not_utf8_fails_in_one_line(tmp_path):
    _image(tmp_path / "a.png")
    manifest = tmp_path / "labels.csv"
    manifest.write_bytes(b"filename,label\na.png,Notre-Dame\nb.png," + "Théâtre\n".encode("latin-1"))
    bad_byte = r"not UTF-8: byte 0xe9 at offset 40 \(line 3\); re-save it as UTF-8"
    with pytest.raises(DataError, match=bad_byte) as error:
        csv_manifest(manifest)
    assert "\n" not in str(error.value)
    manifest.write_bytes(b"\xef\xbb\xbffilename,label\na.png,caf\xe9\n")  # the offset counts the BOM
    with pytest.raises(DataError, match="byte 0xe9 at offset 27 "):
        csv_manifest(manifest)


def test_csv_manifest_warns_about_ragged_rows(tmp_path, caplog):
    manifest = _manifest(tmp_path, "filename,label,color\na.png,cat,gray\nb.png,cat,gray,extra\nc.png,cat\n",
                         "a.png", "b.png", "c.png")
    with caplog.at_level(logging.WARNING):
        dataset = csv_manifest(manifest)
    assert dataset.records[1].metadata == {"color": "gray"} and dataset.records[2].metadata == {"color": ""}
    assert "2 row(s) do not have the header's 3 fields" in caplog.text and "lines 3, 4" in caplog.text
