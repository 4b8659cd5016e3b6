"""Spark batch inference: bad media is quarantined, and Spark equals one process."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from mm_encoder.item_encoder import ItemEncoder, ItemEncoderConfig
from pipelines.embed import embed_arrow_batches, embed_items_spark


def test_undecodable_media_is_quarantined_not_fatal(spark):
    import torch

    from pipelines.synthetic import _bg, _png

    enc = ItemEncoder(ItemEncoderConfig(dim=8, image_size=32, video=False))
    # Fusion weights away from the seeded initialisation (as after alignment): a Spark worker
    # that rebuilt the encoder from its config instead of the shipped artifact would differ.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in enc.fusion.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))

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
    # float32 noise from a different batch composition (MiniLM padding) is about 1e-6.
    for i in (1, 3):
        np.testing.assert_allclose(got[i]["embedding"], local[i]["embedding"], rtol=1e-5,
                                   atol=1e-5)
    assert stats().rows == 3
