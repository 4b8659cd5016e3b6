"""Proofs on real engines beyond one process of each kind (slow: `make test-all`).

* The Spark stages submitted with ``spark-submit`` to a standalone master with two workers
  (started from the pyspark installation on loopback) write snapshots with the content hashes
  of the ``local[*]`` run.
* The train job as two ``torchrun`` nodes (``--nnodes 2 --nproc-per-node 1``, static rendezvous
  on localhost, node ranks 0 and 1 as separate torchrun processes) computes the loss curve and
  the scores of the local 2-rank run.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from recsys.config import ModelConfig, TrainConfig
from recsys.features import build_spec
from recsys.launch import free_port
from recsys.runner import make_job, train_arm
from recsys.testing import random_examples, write_examples

pytestmark = pytest.mark.slow


def _cfg(**kw) -> TrainConfig:
    # No dropout: each rank draws its own masks, so only a deterministic model can be compared.
    model = ModelConfig(dim=8, attention_dim=8, cross_rank=8, mlp=[16], dropout=0.0)
    return TrainConfig(model=model, ranks=2, batch_size=64, epochs=1, sparse_lr=0.1,
                       dense_lr=5e-3, register=False, **kw)


def test_two_torchrun_nodes_train_the_curve_of_two_local_ranks(tmp_path):
    import pyarrow.parquet as pq

    spec = build_spec("codes", dim=8, history_len=5, levels=2, codes_per_level=8, n_items=50,
                      n_users=20, frozen_dim=4, vq_k=3, match_thresholds=(0.3, 0.8))
    train = write_examples(tmp_path / "train", random_examples(1280, seed=1))
    test = write_examples(tmp_path / "eval", random_examples(300, seed=2))
    local = train_arm(spec, _cfg(), train, test, tmp_path / "local", quiet=True)

    out = tmp_path / "nodes"
    job = make_job(spec, _cfg(launcher="torchrun"), train, test, out)
    out.mkdir()
    job.save(out / "job.json")
    port = free_port()
    nodes = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
               "--nproc-per-node=1", f"--node-rank={node}", "--rdzv-backend=static",
               "--master-addr=127.0.0.1", f"--master-port={port}",
               "-m", "recsys.train", "--job", str(out / "job.json")]
        log = open(tmp_path / f"node{node}.log", "w")
        nodes.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=600) for p in nodes]
    assert codes == [0, 0], (tmp_path / "node1.log").read_text()[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["world"] == 2
    np.testing.assert_allclose(result["loss_curve"], local.result["loss_curve"], atol=1e-4)
    # Rank 1 ran in the second node's process; both wrote their share of the scores.
    parts = sorted(out.glob("predictions_rank*.parquet"))
    assert [p.name for p in parts] == ["predictions_rank0.parquet", "predictions_rank1.parquet"]
    import pyarrow as pa

    scored = pa.concat_tables([pq.read_table(p) for p in parts]).sort_by(
        [("user_id", "ascending"), ("item_id", "ascending"), ("ts", "ascending")])
    want = local.predictions.sort_by(
        [("user_id", "ascending"), ("item_id", "ascending"), ("ts", "ascending")])
    np.testing.assert_allclose(scored.column("score").to_numpy(),
                               want.column("score").to_numpy(), atol=1e-4)


# --------------------------------------------------------------------------- Spark standalone
class StandaloneSpark:
    """A Spark standalone master and two one-core workers from the pyspark installation, on
    loopback ports; stopped (with their JVMs) at the end."""

    def __init__(self, root):
        import os
        from pathlib import Path

        import pyspark

        self.home = Path(pyspark.__file__).parent
        self.root = root
        self.port, self.ui = free_port(), free_port()
        self.url = f"spark://127.0.0.1:{self.port}"
        self.env = {**os.environ, "SPARK_HOME": str(self.home), "SPARK_LOCAL_IP": "127.0.0.1",
                    "SPARK_WORKER_DIR": str(root / "work"), "PYSPARK_PYTHON": sys.executable}
        self.procs = []

    def _start(self, name, *args):
        log = open(self.root / f"{name}.log", "w")
        self.procs.append(subprocess.Popen(
            [str(self.home / "bin" / "spark-class"), *args], env=self.env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True))

    def __enter__(self):
        import time
        import urllib.request

        self.root.mkdir(parents=True, exist_ok=True)
        self._start("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                    "--port", str(self.port), "--webui-port", str(self.ui))
        for w in (1, 2):
            self._start(f"worker{w}", "org.apache.spark.deploy.worker.Worker", "--cores", "1",
                        "--memory", "2g", "--webui-port", str(free_port()), self.url)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.ui}/json/") as r:
                    if json.loads(r.read())["aliveworkers"] == 2:
                        return self
            except OSError:
                pass
            time.sleep(1)
        self.__exit__()
        raise RuntimeError(f"the standalone cluster did not come up: see {self.root}/*.log")

    def __exit__(self, *exc):
        import os
        import signal

        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


SPARK_STAGES_UNTIL = "examples"


def _run_args(root):
    from tests.conftest import tiny_world_overrides

    out = []
    for o in tiny_world_overrides(root) + ["mlflow.enabled=false", "encoder.image_size=32",
                                           "encoder.dim=16", "align.epochs=2",
                                           "quantize.rq.codes=8", "quantize.rq.levels=2",
                                           "quantize.vq.k=5", "pairs.min_support=1",
                                           # A torch stage, not part of this Spark proof.
                                           "pretrain.enabled=false"]:
        out += ["--set", o]
    return ["run", *out, "--ds", "2026-01-31", "--until", SPARK_STAGES_UNTIL, "--no-progress"]


def test_spark_stages_on_a_standalone_cluster_write_the_snapshots_of_local_mode(tmp_path):
    from pathlib import Path

    from feature_store.snapshots import SnapshotStore

    cli = str(Path(__file__).resolve().parents[1] / "jobs" / "cli.py")
    local = subprocess.run([sys.executable, cli, *_run_args(tmp_path / "local")],
                           capture_output=True, text=True)
    assert local.returncode == 0, local.stderr[-3000:]
    with StandaloneSpark(tmp_path / "cluster") as cluster:
        submit = subprocess.run(
            [str(cluster.home / "bin" / "spark-submit"), "--master", cluster.url,
             "--conf", f"spark.pyspark.python={sys.executable}",
             "--conf", f"spark.pyspark.driver.python={sys.executable}",
             "--conf", "spark.executor.memory=1g", cli, *_run_args(tmp_path / "remote")],
            env=cluster.env, capture_output=True, text=True)
        assert submit.returncode == 0, submit.stderr[-4000:]
        app_log = "\n".join(p.read_text() for p in (tmp_path / "cluster").glob("worker*.log"))
    # The executors ran on the cluster's workers (each launched an executor for the app).
    assert app_log.count("Launching executor") >= 2 or "Asked to launch executor" in app_log
    a, b = SnapshotStore(str(tmp_path / "local" / "store")), \
        SnapshotStore(str(tmp_path / "remote" / "store"))
    tables = sorted(p.name for p in (tmp_path / "local" / "store").iterdir() if p.is_dir())
    assert "examples" not in tables and {"events", "item_embeddings", "item_codes",
                                         "train_examples"} <= set(tables)
    differ = {t: (a.get(t).row_count, b.get(t).row_count) for t in tables
              if a.get(t).content_hash != b.get(t).content_hash}
    assert not differ, f"tables whose content differs between local[*] and the cluster: {differ}"
