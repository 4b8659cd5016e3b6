"""Shared by the benchmarks: a scratch folder per run, and the result printed as JSON."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional


def scratch_dir(prefix: str) -> Path:
    """A temporary folder for one benchmark run, removed when the process exits.

    The benchmarks write gigabytes (examples, shuffle files, Parquet copies); left behind, a few
    runs fill a CI disk. Set ``QARM_BENCH_KEEP=1`` to keep the folder for inspection: its path is
    printed on stderr then.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if os.environ.get("QARM_BENCH_KEEP"):
        print(f"[bench] keeping {path}", file=sys.stderr, flush=True)
    else:
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def emit(result: dict, out: Optional[str]) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
