"""Markdown tables, as the experiments print them for the README."""
from __future__ import annotations


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A header row, the separator, then one row per list (cells through `str`)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
