"""The HTML report of a run (`report/index.html`) and its helpers, parsed with the standard library's parser."""

from __future__ import annotations

import csv
import json
from html.parser import HTMLParser
from pathlib import Path

from conftest import TINY_BUILTIN
from hetretrieval.analysis.html_report import page, relative_link, section, table


class Parsed(HTMLParser):
    """Sections by id, every table's header and body rows as text, every src/href, and the scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.tables: list[dict] = []
        self.targets: list[str] = []
        self.scripts: list[str] = []
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs["id"])
        elif tag == "table":
            self.tables.append({"section": self.sections[-1], "class": attrs.get("class"), "head": [], "rows": []})
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "script":
            self._in_script = True
        self.targets += [attrs[k] for k in ("src", "href") if k in attrs]

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr":
            current = self.tables[-1]
            if current["head"]:
                current["rows"].append(self._row)
            else:
                current["head"] = self._row
        elif tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._in_script:
            self.scripts.append(data)


def _parse(text: str) -> Parsed:
    parsed = Parsed()
    parsed.feed(text)
    return parsed


def test_table_escapes_cells_formats_floats_and_marks_sortable():
    html = table([{"class": "<b>&", "mAP": 0.123456, "n": 3}, {"class": "x", "mAP": None, "n": 10}],
                 ["class", "mAP", "n"], sortable=True)
    parsed = _parse(section("s", "S", html))
    assert parsed.tables == [{"section": "s", "class": "sortable", "head": ["class", "mAP", "n"],
                              "rows": [["<b>&", "0.1235", "3"], ["x", "", "10"]]}]
    assert "&lt;b&gt;&amp;" in html


def test_page_is_offline_and_links_are_relative(tmp_path):
    parsed = _parse(page("t", [section("a", "A", "<p>x</p>")]))
    assert parsed.sections == ["a"] and parsed.targets == []  # no CDN, no external asset
    assert "sortable" in "".join(parsed.scripts)
    assert relative_link(tmp_path / "run" / "report" / "figure.png", tmp_path / "run" / "report") == "figure.png"
    assert relative_link(tmp_path / "run" / "summary.json", tmp_path / "run" / "report") == "../summary.json"


def test_run_report_shows_every_section_and_every_link_resolves(compose_eval, tmp_path):
    from hetretrieval.cli.evaluate import evaluate

    summary = evaluate(compose_eval(*TINY_BUILTIN, "evaluation.report=true"))
    run = tmp_path / "run"
    report = run / "report" / "index.html"
    parsed = _parse(report.read_text(encoding="utf-8"))
    assert parsed.sections == ["summary", "figures", "per-class", "grids", "correlation", "skipped"]
    assert all(not t.startswith(("http:", "https:", "//")) for t in parsed.targets)
    for target in parsed.targets:
        assert (report.parent / target).is_file(), target
    shown = {Path(t).name for t in parsed.targets}
    assert {"per_class_map.png", "figure4_best.png", "figure4_worst.png", "correlation_heatmap.png",
            "summary.json", "per_class_map.csv", "correlations.csv"} <= shown
    with (run / "per_class_map.csv").open(newline="") as handle:
        per_class = list(csv.reader(handle))
    tables = {t["section"]: t for t in parsed.tables}
    assert tables["per-class"]["class"] == "sortable"
    assert [tables["per-class"]["head"], *tables["per-class"]["rows"]] == per_class
    with (run / "report" / "correlation_pearson.csv").open(newline="") as handle:
        correlation = list(csv.reader(handle))
    assert len(tables["correlation"]["rows"]) == len(correlation) - 1
    facts = dict(tables["summary"]["rows"])
    assert float(facts["mAP"]) == round(summary["mAP"], 4)
    assert json.loads((run / "summary.json").read_text())["skipped"] == []
    assert "skipped" not in tables  # nothing skipped: a sentence, not an empty table
