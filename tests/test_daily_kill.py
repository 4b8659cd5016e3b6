"""A day of the daily job killed with SIGKILL during ``embed`` and again during ``train``, then
rerun, ends with the same snapshots (content hashes) and the same model as an uninterrupted
day (``make test-all``: it runs the day four times)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_daily import D1, D2, _qarm, _sets

pytestmark = pytest.mark.slow

#: Long enough a warm start to be killed in the middle of (checkpoints every 2 steps).
KILL = ["train.epochs=30", "train.patience=30", "train.checkpoint_every=2",
        "retrieval.towers=[codes]"]


def _qarm_process(root: Path, ds: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jobs.cli", "run", "--ds", D2, "--until", "train",
           "--no-progress", *_sets(root, *KILL)]
    assert ds == D2
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, cwd=Path(__file__).resolve().parents[1])


def _kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 900) -> None:
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() - t0 < timeout, f"no {what} after {timeout} s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _day_hashes(root: Path, ds: str) -> dict[str, str]:
    from feature_store.snapshots import SnapshotStore
    from jobs.state import RunState

    store = SnapshotStore(str(root / "store"))
    out = {}
    for r in RunState(root / "state.db").rows(ds):
        if r["status"] == "done":
            for table, ref in r["outputs"].items():
                out[table] = store.resolve(ref).content_hash
    return out


def _model(root: Path, ds: str) -> dict:
    from recsys.runner import load_trained

    return load_trained(root / "runs" / ds / "train" / "codes").state_dict()


def test_a_day_killed_in_embed_and_in_train_reruns_to_the_uninterrupted_result(spark,
                                                                              tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    for root in (ref, killed):
        rc, out = _qarm("run", "--ds", D1, "--until", "train", "--no-progress",
                        *_sets(root, *KILL))
        assert rc == 0, out
    rc, out = _qarm("run", "--ds", D2, "--until", "train", "--no-progress", *_sets(ref, *KILL))
    assert rc == 0, out

    # Killed while embed writes its first snapshot of the day.
    n_emb = len(list((killed / "store" / "item_embeddings").iterdir()))
    proc = _qarm_process(killed, D2)
    _kill_when(proc, lambda: len(list((killed / "store" / "item_embeddings").iterdir())) > n_emb,
               "embed snapshot being written")
    # Killed in the middle of the warm-started training (after its first checkpoints).
    ckpts = killed / "runs" / D2 / "train" / "codes" / "checkpoints"
    proc = _qarm_process(killed, D2)
    _kill_when(proc, lambda: ckpts.exists() and len(list(ckpts.glob("step_*"))) >= 2,
               "training checkpoint")
    assert not (killed / "runs" / D2 / "train" / "codes" / "model" / "meta.json").exists()
    rc, out = _qarm("run", "--ds", D2, "--until", "train", "--no-progress",
                    *_sets(killed, *KILL))
    assert rc == 0, out

    want, got = _day_hashes(ref, D2), _day_hashes(killed, D2)
    assert set(got) == set(want)
    differ = {t for t in want if want[t] != got[t]}
    assert not differ, f"snapshots differ from the uninterrupted day: {sorted(differ)}"
    a, b = _model(ref, D2), _model(killed, D2)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
