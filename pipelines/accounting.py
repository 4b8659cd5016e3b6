"""Row accounting (every row that enters a job leaves it as output or as a quarantine row), and
the error for data the evaluation protocol cannot use."""

from __future__ import annotations


class RowAccountingError(RuntimeError):
    """Rows in != rows out + rows quarantined: a bug, never a data problem."""


def check_rows(what: str, rows_in: int, rows_out: int, quarantined: int = 0) -> None:
    """Raise :class:`RowAccountingError` unless ``rows_in == rows_out + quarantined``."""
    if rows_in != rows_out + quarantined:
        raise RowAccountingError(f"{what}: {rows_in} rows in != {rows_out} out + {quarantined} "
                                 "quarantined")


class UnusableData(ValueError):
    """The data cannot support the protocol: no events, one label class only, or too few users
    or days for the configured split. The message names the problem and what to change."""
