"""Plain-text tables for the console and markdown reports."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def format_table(rows: Sequence[Mapping], columns: Sequence[str], float_format: str = "{:.4f}") -> str:
    """A fixed-width text table of `rows` restricted to `columns` (floats formatted, None shown as '-')."""
    def cell(value) -> str:
        if value is None:
            return "-"
        return float_format.format(value) if isinstance(value, float) else str(value)

    body = [[cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in body)) if body else len(column)
              for i, column in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in body]
    return "\n".join(lines)


def format_markdown_table(rows: Sequence[Mapping], columns: Sequence[str], float_format: str = "{:.3f}") -> str:
    """A GitHub-markdown table of `rows` restricted to `columns`."""
    def cell(value) -> str:
        if value is None:
            return "-"
        return float_format.format(value) if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
