"""The quantize stage's Spark side: fit codebooks on a sample, assign codes to every item.

Fitting happens on the driver over a sample of at most ``fit_sample`` embeddings (a Spark
``sample``, never a collect of the whole table). Assignment broadcasts the codebook (centroids +
VQ pool, a few MB) and runs in Python workers over Arrow batches; each worker rebuilds the faiss
index once per codebook version and keeps it for every task it runs.
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import pyarrow as pa

from quantizer.codebook import Codebook

log = logging.getLogger(__name__)

_CODEBOOKS: dict[str, Codebook] = {}


def cached_codebook(version: str, data: bytes, threads: int) -> Codebook:
    cb = _CODEBOOKS.get(version)
    if cb is None:
        import faiss
        import torch

        faiss.omp_set_num_threads(threads)
        torch.set_num_threads(threads)
        cb = Codebook.from_bytes(data)
        cb.vq.index  # build the faiss index now, once per worker
        _CODEBOOKS.clear()
        _CODEBOOKS[version] = cb
    return cb


def out_schema() -> pa.Schema:
    return pa.schema([("item_id", pa.int64()), ("rq", pa.list_(pa.int32())),
                      ("vq", pa.list_(pa.int32())), ("codebook_version", pa.string())])


def assign_batches(batches: Iterator[pa.RecordBatch], cb: Codebook) -> Iterator[pa.RecordBatch]:
    """Arrow batches of (item_id, embedding) → (item_id, rq, vq, codebook_version)."""
    levels = cb.rq.centroids.shape[0]
    schema = out_schema()
    for batch in batches:
        if batch.num_rows == 0:
            continue
        ids = batch.column("item_id").to_numpy()
        emb = batch.column("embedding")
        dim = cb.rq.centroids.shape[2]
        vecs = emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)
        rq, vq = cb.encode(ids, vecs)
        yield pa.RecordBatch.from_arrays([
            pa.array(ids, pa.int64()),
            pa.ListArray.from_arrays(pa.array(np.arange(0, rq.size + 1, levels, dtype=np.int32)),
                                     pa.array(rq.ravel(), pa.int32())),
            pa.ListArray.from_arrays(
                pa.array(np.arange(0, vq.size + 1, vq.shape[1], dtype=np.int32)),
                pa.array(vq.ravel(), pa.int32())),
            pa.array([cb.version] * len(ids), pa.string()),
        ], schema=schema)


def assign_codes_spark(spark, embeddings_df, cb: Codebook, *, partitions: int,
                       threads_per_task: int = 1):
    """Codes for every row of ``embeddings_df`` (item_id, embedding) as a DataFrame."""
    from pipelines.spark import arrow_schema_to_spark

    data = spark.sparkContext.broadcast(cb.to_bytes())
    version = cb.version

    def task(batches):
        yield from assign_batches(batches, cached_codebook(version, data.value, threads_per_task))

    df = embeddings_df.select("item_id", "embedding").repartition(partitions)
    return df.mapInArrow(task, arrow_schema_to_spark(out_schema()))


def sample_embeddings(df, n_total: int, n_sample: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of a seeded sample of about ``n_sample`` rows (all rows when fewer)."""
    if n_total > n_sample:
        df = df.sample(fraction=min(1.0, 1.1 * n_sample / n_total), seed=seed).limit(n_sample)
    table = df.select("item_id", "embedding").toArrow()
    ids = table.column("item_id").to_numpy()
    emb = table.column("embedding").combine_chunks()
    vecs = emb.flatten().to_numpy(zero_copy_only=False).reshape(len(ids), -1)
    order = np.argsort(ids, kind="stable")  # the fit must not depend on partition order
    return ids[order], np.ascontiguousarray(vecs[order], dtype=np.float32)


def disambiguate(codes_df):
    """Append to each ``rq`` code the item's rank among the items sharing that full code
    (ordered by item id), making every code unique. Ranks are recomputed on each assignment."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    w = Window.partitionBy("rq").orderBy("item_id")
    return codes_df.withColumn(
        "rq", F.concat("rq", F.array((F.row_number().over(w) - 1).cast("int"))))
