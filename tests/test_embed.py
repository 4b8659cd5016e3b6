"""The Spark embed stage: one embedding per item, model loaded once per worker, bad media quarantined."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from feature_store.snapshots import SnapshotStore
from jobs.cli import main
from jobs.config import load_config
from mm_encoder.item_encoder import ItemEncoder, ItemEncoderConfig
from pipelines.embed import embed_arrow_batches, embed_items_spark
from tests.conftest import tiny_world_overrides


def _args(root, *extra):
    out = []
    for o in tiny_world_overrides(root) + ["encoder.image_size=32", "encoder.dim=16",
                                           "embed.partitions=6"]:
        out += ["--set", o]
    return [*out, "--ds", "2026-01-31", "--no-progress", *extra]


def test_embed_stage_writes_one_unit_embedding_per_item(spark, tmp_path, capsys):
    root = tmp_path / "q"
    assert main(["run", *_args(root, "--until", "embed")]) == 0
    out = capsys.readouterr().out
    assert "embedded 120 of 120 items" in out
    store = SnapshotStore(str(root / "store"))
    m = store.get("item_embeddings")
    emb = store.read_arrow("item_embeddings")
    assert emb.schema.field("embedding").type == pa.list_(pa.float32(), 16)
    assert emb.num_rows == store.get("items").row_count == 120
    assert len(set(emb.column("item_id").to_pylist())) == 120
    vecs = np.stack(emb.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    assert set(emb.column("encoder_version").to_pylist()) == {m.extra["encoder_version"]}

    from jobs.dag import Dag

    cfg = load_config(None, tiny_world_overrides(root))
    rec = Dag(cfg).state.last_success("2026-01-31", "embed")
    # Loaded once per Python worker process (2 cores), not once per partition (6) or batch.
    assert 1 <= rec["metrics"]["encoder_loads"] < 6
    assert main(["run", *_args(root, "--until", "embed")]) == 0
    assert "embed      skipped" in capsys.readouterr().out


def test_undecodable_media_is_quarantined_not_fatal(spark):
    enc = ItemEncoder(ItemEncoderConfig(dim=8, image_size=32, video=False))
    from pipelines.synthetic import _bg, _png

    good = _png(_bg("grass", 32, np.random.default_rng(0)))
    rows = [{"item_id": 1, "title": "ok", "text": None, "tags": None, "image": good,
             "video": None},
            {"item_id": 2, "title": "bad", "text": None, "tags": None, "image": b"not an image",
             "video": None},
            {"item_id": 3, "title": "text only", "text": "x", "tags": ["a"], "image": None,
             "video": None}]
    schema = pa.schema([("item_id", pa.int64()), ("title", pa.string()), ("text", pa.string()),
                        ("tags", pa.list_(pa.string())), ("image", pa.binary()),
                        ("video", pa.list_(pa.binary()))])
    df = spark.createDataFrame(pa.Table.from_pylist(rows, schema).to_pandas())
    out, stats = embed_items_spark(spark, df, enc, batch_size=2, threads_per_task=1,
                                   partitions=2)
    got = {r["item_id"]: r for r in out.collect()}
    assert got[2]["_reason"] == "undecodable_image" and got[2]["embedding"] is None
    assert got[1]["_reason"] is None and len(got[1]["embedding"]) == 8
    assert got[3]["_reason"] is None
    # Spark and a single process give the same embeddings for the same items.
    local = {b["item_id"]: b for batch in embed_arrow_batches(
        iter(pa.Table.from_pylist(rows, schema).to_batches()), enc, enc.version, 2)
        for b in batch.to_pylist()}
    np.testing.assert_allclose(got[1]["embedding"], local[1]["embedding"], rtol=1e-5)
    assert stats().rows == 3
