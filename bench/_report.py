"""Shared by the benchmarks: print the result as JSON and optionally keep a copy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def emit(result: dict, out: Optional[str]) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
