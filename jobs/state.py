"""Run state: every stage run per ``ds`` in SQLite (``<root>/state.db``), so ``qarm status`` can
show it and concurrent ``qarm`` processes do not corrupt it."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Optional


class RunState:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        with self._conn() as c:
            c.execute("""CREATE TABLE IF NOT EXISTS stage_runs (
                ds TEXT, stage TEXT, status TEXT, input_key TEXT, inputs TEXT, outputs TEXT,
                metrics TEXT, mlflow_run_id TEXT, started REAL, finished REAL, error TEXT)""")

    def _conn(self):
        return sqlite3.connect(self.path, timeout=30)

    def record(self, **row) -> None:
        cols = ", ".join(row)
        with self._conn() as c:
            c.execute(f"INSERT INTO stage_runs ({cols}) VALUES ({', '.join('?' * len(row))})",
                      [json.dumps(v) if isinstance(v, (dict, list)) else v for v in row.values()])

    def last_success(self, ds: str, stage_name: str) -> Optional[dict]:
        with self._conn() as c:
            c.row_factory = sqlite3.Row
            r = c.execute("SELECT * FROM stage_runs WHERE ds=? AND stage=? AND status='done' "
                          "ORDER BY finished DESC LIMIT 1", (ds, stage_name)).fetchone()
        return None if r is None else _decoded(dict(r))

    def last_success_before(self, ds: str, stage_name: str) -> Optional[dict]:
        """The latest successful run of ``stage_name`` for the latest ``ds`` before ``ds``."""
        with self._conn() as c:
            c.row_factory = sqlite3.Row
            r = c.execute("SELECT * FROM stage_runs WHERE ds<? AND stage=? AND status='done' "
                          "ORDER BY ds DESC, finished DESC LIMIT 1", (ds, stage_name)).fetchone()
        return None if r is None else _decoded(dict(r))

    def rows(self, ds: Optional[str] = None) -> list[dict]:
        with self._conn() as c:
            c.row_factory = sqlite3.Row
            q = "SELECT * FROM stage_runs" + (" WHERE ds=?" if ds else "") + " ORDER BY started"
            return [_decoded(dict(r)) for r in c.execute(q, (ds,) if ds else ())]


def _decoded(row: dict) -> dict:
    for k in ("inputs", "outputs", "metrics"):
        row[k] = json.loads(row[k]) if row[k] else {}
    return row
