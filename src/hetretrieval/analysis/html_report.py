"""Self-contained HTML pages: a run's `report/index.html` and a search's query page, from one set of helpers.

The pages only show what the run or search wrote (figures linked relatively, tables read from its CSV/JSON
files); nothing is recomputed. No external asset: the style and the table sorting (click a header) are inline,
so a page opens offline and from a copied folder.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path

from hetretrieval.analysis.results import PER_CLASS, PER_QUERY, SUMMARY
from hetretrieval.data.images import ImageLoadError, load_image

REPORT_PAGE = "index.html"

STYLE = """
body{font-family:sans-serif;margin:1.5em;max-width:1300px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-top:.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:.9em}
th{background:#eee}table.sortable th{cursor:pointer}table.sortable th:after{content:" \\2195";color:#999}
td.num{text-align:right;font-variant-numeric:tabular-nums}
img.figure{max-width:100%;border:1px solid #ddd}
.results{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}
.result{border:3px solid #999;padding:2px;text-align:center;font-size:.8em;max-width:260px;word-break:break-all}
.result.query{border-color:#1a4dcc}.result img{max-width:250px;max-height:250px;display:block;margin:auto}
"""

# a click on a header sorts its table by that column (numbers numerically, empty cells last), again: reversed
SORT_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function(th, column){
  th.addEventListener("click", function(){
    var table = th.closest("table"), body = table.tBodies[0], rows = Array.from(body.rows);
    var up = th.dataset.order !== "up"; th.dataset.order = up ? "up" : "down";
    function key(row){ var text = row.cells[column].textContent.trim(), n = Number(text);
      return text === "" ? null : (isNaN(n) ? text : n); }
    rows.sort(function(a, b){ var x = key(a), y = key(b);
      if (x === null) return 1; if (y === null) return -1;
      var c = (typeof x === "number" && typeof y === "number") ? x - y : String(x).localeCompare(String(y));
      return up ? c : -c; });
    rows.forEach(function(row){ body.appendChild(row); });
  });
});
"""


def page(title: str, sections: Sequence[str]) -> str:
    """A complete HTML document: `title` and the `sections` (HTML strings), the style and sorting inline."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n<body>\n<h1>{escape(title)}</h1>\n"
            + "\n".join(sections) + f"\n<script>{SORT_SCRIPT}</script>\n</body></html>\n")


def section(anchor: str, title: str, *content: str) -> str:
    return f'<section id="{escape(anchor)}"><h2>{escape(title)}</h2>\n' + "\n".join(content) + "\n</section>"


def paragraph(text: str) -> str:
    return f"<p>{escape(text)}</p>"


def _cell(value) -> str:
    if value is None or value == "":
        return "<td></td>"
    if isinstance(value, float):
        return f'<td class="num">{value:.4f}</td>'
    text = str(value)
    try:
        float(text)
    except ValueError:
        return f"<td>{escape(text)}</td>"
    return f'<td class="num">{escape(text)}</td>'


def table(rows: Sequence[Mapping], columns: Sequence[str], sortable: bool = False) -> str:
    """An HTML table of `rows` restricted to `columns` (floats to 4 decimals); `sortable`: click to sort."""
    head = "".join(f"<th>{escape(str(c))}</th>" for c in columns)
    body = "\n".join("<tr>" + "".join(_cell(row.get(c)) for c in columns) + "</tr>" for row in rows)
    kind = ' class="sortable"' if sortable else ""
    return f"<table{kind}><thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table>"


def relative_link(target: Path, page_dir: Path) -> str:
    """`target` relative to the page's folder, URL-style (so the page survives a copy of the whole folder)."""
    return Path(os.path.relpath(target, page_dir)).as_posix()


def figure(target: Path, page_dir: Path, caption: str) -> str:
    link = escape(relative_link(target, page_dir))
    return (f'<figure><a href="{link}"><img class="figure" src="{link}" alt="{escape(caption)}"></a>'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def link(target: Path, page_dir: Path, text: str) -> str:
    return f'<a href="{escape(relative_link(target, page_dir))}">{escape(text)}</a>'


def thumbnail(path: str | Path, max_size: int = 256) -> str | None:
    """The image as a `data:image/jpeg;base64,...` URI, longer side at most `max_size`; None if unreadable."""
    from PIL import Image

    try:
        pixels = load_image(path, max_size)
    except ImageLoadError:
        return None
    array = (pixels.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_card(path: str | Path, caption: str, kind: str = "result", max_size: int = 256) -> str:
    uri = thumbnail(path, max_size)
    picture = f'<img src="{uri}" alt="{escape(Path(path).name)}">' if uri else "<p>(unreadable)</p>"
    return f'<div class="{kind} result">{picture}{escape(caption)}</div>'


def _csv_rows(path: Path) -> tuple[list[dict], list[str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader), list(reader.fieldnames or [])


FIGURES = (("per_class_heatmap", "per-class mAP"), ("best", "best classes: median query and its top results"),
           ("worst", "worst classes: median query and its top results"),
           ("correlation_heatmap", "correlation of per-class mAP with the images' variation tags"))


def write_run_report(run_dir: str | Path, report: Mapping[str, Path]) -> Path:
    """`<run>/report/index.html`: the summary, its figures, the per-class table (sortable), the best / worst
    grids, the correlation table and heatmap, and the skipped images, from the files the run and `report`
    (the report's files by name, `evaluation.publish.write_report`) hold."""
    run_dir = Path(run_dir)
    page_dir = run_dir / "report"
    page_dir.mkdir(parents=True, exist_ok=True)
    summary = json.loads((run_dir / SUMMARY).read_text(encoding="utf-8"))
    present = {name: Path(path) for name, path in report.items() if Path(path).is_file()}
    facts = [{"": key, "value": summary[key]} for key in
             ("descriptor", "backbone", "dataset", "dim", "mAP", "class_mAP", "mAP_before_expansion",
              *sorted(k for k in summary if k.startswith(("mP@", "mR@"))), "descriptor_cache") if key in summary]
    facts += [{"": key, "value": value} for key, value in summary.get("counts", {}).items()]
    facts += [{"": f"timings: {key}", "value": value} for key, value in summary.get("timings", {}).items()]
    files = [link(run_dir / name, page_dir, name) for name in (SUMMARY, PER_CLASS, PER_QUERY) if (run_dir / name).is_file()]
    files += [link(path, page_dir, path.name) for name, path in present.items() if path.suffix in (".md", ".csv")]
    sections = [section("summary", "Summary", table(facts, ["", "value"]), "<p>Files: " + " · ".join(files) + "</p>")]
    sections.append(section("figures", "Summary figures", *[figure(present[name], page_dir, caption)
                                                              for name, caption in FIGURES[:1] if name in present]
                            or [paragraph("no figure was written for this run")]))
    if (run_dir / PER_CLASS).is_file():
        rows, columns = _csv_rows(run_dir / PER_CLASS)
        sections.append(section("per-class", f"Per-class mAP ({len(rows)} classes; click a header to sort)",
                                table(rows, columns, sortable=True)))
    grids = [figure(present[name], page_dir, caption) for name, caption in FIGURES[1:3] if name in present]
    sections.append(section("grids", "Best and worst classes", *grids or [paragraph("no grid was written")]))
    correlation = [figure(present["correlation_heatmap"], page_dir, FIGURES[3][1])] \
        if "correlation_heatmap" in present else []
    if "correlation_csv" in present:
        rows, columns = _csv_rows(present["correlation_csv"])
        correlation.insert(0, table(rows, columns, sortable=True))
    sections.append(section("correlation", "Correlation with variation tags", *correlation or [
        paragraph("no correlation: the images carry no variation tag that varies across classes")]))
    skipped = summary.get("skipped", [])
    sections.append(section("skipped", f"Skipped images ({len(skipped)})",
                            table(skipped, ["path", "reason"], sortable=True) if skipped
                            else paragraph("every image was described")))
    title = f"{summary.get('descriptor', run_dir.name)} on {summary.get('dataset', '?')}"
    path = page_dir / REPORT_PAGE
    path.write_text(page(title, sections), encoding="utf-8")
    return path


def write_search_page(path: str | Path, results: Mapping[str, Sequence], skipped: Mapping[str, str],
                      contact_sheet: str | None = None, max_size: int = 256) -> Path:
    """A search's page: each query beside its ranked results (thumbnails embedded, so the page stands alone;
    `results[query]` holds `Neighbour`s with `path` and `caption`), the results table and skipped queries."""
    path = Path(path)
    sections = []
    for query, found in results.items():
        cards = [image_card(query, f"query: {Path(query).name}", "query", max_size)]
        cards += [image_card(n.path, f"{n.caption} {Path(n.path).name}", "result", max_size) for n in found]
        rows = [{"rank": n.rank, "similarity": n.similarity, "inliers": n.inliers, "image_id": n.image_id,
                 "path": n.path} for n in found]
        sections.append(section(f"query-{len(sections)}", f"{Path(query).name}: top {len(found)}",
                                f'<div class="results">{"".join(cards)}</div>',
                                table(rows, ["rank", "similarity", "inliers", "image_id", "path"], sortable=True)))
    if contact_sheet:
        sections.append(section("contact-sheet", "Contact sheet", figure(path.parent / contact_sheet, path.parent,
                                                                          "queries and their top results")))
    if skipped:
        sections.append(section("skipped", f"Skipped queries ({len(skipped)})",
                                table([{"path": q, "reason": r} for q, r in skipped.items()], ["path", "reason"])))
    path.write_text(page(f"search: {len(results)} queries", sections), encoding="utf-8")
    return path
