"""The ranker benchmark's phase breakdown: TorchRec 1 rank and plain SparseAdam stepped in one
process on the same batches, each phase timed (what the performance note reads)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "ranker_throughput.py"


def test_the_phase_breakdown_times_both_sides_on_the_same_batches(tmp_path):
    from recsys.config import ModelConfig, TrainConfig
    from recsys.features import build_spec
    from recsys.runner import make_job
    from recsys.testing import random_examples, write_examples

    t = random_examples(1200, n_items=300, n_users=80, levels=2, codes=8, vq_k=3, hist=5,
                        seed=3)
    files = write_examples(tmp_path / "train", t)
    ev = write_examples(tmp_path / "eval", t.slice(0, 64), files=1)
    spec = build_spec("codes", dim=8, history_len=5, levels=2, codes_per_level=8, n_items=300,
                      n_users=80, vq_k=3)
    cfg = TrainConfig(model=ModelConfig(dim=8, mlp=[16]), ranks=1, batch_size=64, epochs=1,
                      register=False)
    make_job(spec, cfg, files, ev, tmp_path / "job").save(tmp_path / "job.json")
    p = subprocess.run([sys.executable, str(BENCH), "--phase-worker", "--job",
                        str(tmp_path / "job.json"), "--threads", "1", "--repeats", "1",
                        "--phase-steps", "12"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["steps"] == 12 and out["batch"] == 64
    for side in ("torchrec_1rank", "plain_sparse_adam"):
        ms = out["ms_per_step"][side]
        assert all(ms[k] > 0 for k in ("forward", "backward", "optimizer", "lookups"))
        assert abs(ms["step"] - (ms["forward"] + ms["backward"] + ms["optimizer"])) < 1e-6
        # Two interleaved rounds (repeats + 1); the best is the one reported.
        assert len(out["all_step_ms"][side]) == 2
        assert min(out["all_step_ms"][side]) == round(ms["step"], 2)
