"""The benchmarks' scratch folders do not outlive the run (they hold gigabytes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPT = f"""
import sys
sys.path.insert(0, {str(BENCH)!r})
from _report import scratch_dir
tmp = scratch_dir("qarm-bench-test-")
(tmp / "part-0.parquet").write_bytes(b"x" * 1024)
print(tmp)
if sys.argv[1] == "fail":
    raise SystemExit("the benchmark failed")
"""


@pytest.mark.parametrize("how", ["ok", "fail"])
def test_a_benchmarks_scratch_folder_is_removed_when_it_exits(how, tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("QARM_BENCH_KEEP", None)
    p = subprocess.run([sys.executable, "-c", SCRIPT, how], env=env, capture_output=True,
                       text=True)
    assert p.returncode == (0 if how == "ok" else 1), p.stderr
    folder = Path(p.stdout.strip())
    assert folder.parent == tmp_path
    assert not folder.exists()


def test_qarm_bench_keep_keeps_the_folder_and_says_where(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path), "QARM_BENCH_KEEP": "1"}
    p = subprocess.run([sys.executable, "-c", SCRIPT, "ok"], env=env, capture_output=True,
                       text=True)
    folder = Path(p.stdout.strip())
    assert (folder / "part-0.parquet").stat().st_size == 1024
    assert f"keeping {folder}" in p.stderr
