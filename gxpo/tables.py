"""Plain-text tables for terminals and Markdown-free logs. Imports nothing from the package."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def format_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], float_format: str = ".4f"
) -> str:
    """Plain-text table: one line per row, numbers right-aligned, floats as `float_format`,
    missing values as "-"."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return format(value, float_format) if isinstance(value, float) else str(value)

    def is_number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
    right = [any(is_number(row.get(c)) for row in rows) for c in columns]

    def line(values: Sequence[str]) -> str:
        padded = (v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right))
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(columns), rule] + [line(c) for c in cells])
