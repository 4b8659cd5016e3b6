"""Text tables for the stage reports a person reads after a run (one formatter, no hand-aligned
f-strings)."""

from __future__ import annotations

from typing import Iterable, Sequence


def text_table(columns: Sequence[tuple[str, str]], rows: Iterable[Sequence]) -> str:
    """A table with one column per ``(header, format spec)``, e.g. ``("AUC", ".4f")``.

    Numbers are right-aligned, text left-aligned; each column is as wide as its widest cell."""
    cells = [[format(v, spec) for v, (_, spec) in zip(row, columns)] for row in rows]
    header = [h for h, _ in columns]
    widths = [max([len(h)] + [len(r[j]) for r in cells]) for j, h in enumerate(header)]
    numeric = [any(c in spec for c in "dfeg%") or spec.startswith(">") for _, spec in columns]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(header)] + [line(r) for r in cells])
