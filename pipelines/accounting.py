"""Row accounting: every row that enters a job leaves it as output or as a quarantine row."""

from __future__ import annotations


class RowAccountingError(RuntimeError):
    """Rows in != rows out + rows quarantined: a bug, never a data problem."""


def check_rows(what: str, rows_in: int, rows_out: int, quarantined: int = 0) -> None:
    """Raise :class:`RowAccountingError` unless ``rows_in == rows_out + quarantined``."""
    if rows_in != rows_out + quarantined:
        raise RowAccountingError(f"{what}: {rows_in} rows in != {rows_out} out + {quarantined} "
                                 "quarantined")
