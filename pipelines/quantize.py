"""The quantize stage's Spark side: fit codebooks on a sample, assign codes to every item.

Fitting happens on the driver over a sample of at most ``fit_sample`` embeddings (a Spark
``sample``, never a collect of the whole table). Assignment broadcasts the codebook (centroids +
VQ pool, a few MB) and runs in Python workers over Arrow batches; each worker rebuilds the faiss
index once per codebook version and keeps it for every task it runs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np
import pyarrow as pa

from feature_store.arrays import ids_and_matrix, list_matrix, matrix_column
from feature_store.schemas import spark_schema
from pipelines.config import QuantizeConfig
from pipelines.spark import by_item
from quantizer.config import resolve_rq
from quantizer.codebook import Codebook, CodebookExists
from quantizer.metrics import codebook_metrics
from quantizer.rq import ResidualKMeans
from quantizer.vq import NeighbourCodes, exact_overlap

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

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
    schema = out_schema()
    for batch in batches:
        if batch.num_rows == 0:
            continue
        ids = batch.column("item_id").to_numpy()
        rq, vq = cb.encode(ids, list_matrix(batch.column("embedding"), np.float32))
        yield pa.RecordBatch.from_arrays([
            pa.array(ids, pa.int64()), matrix_column(rq, pa.int32()), matrix_column(vq, pa.int32()),
            pa.array([cb.version] * len(ids), pa.string()),
        ], schema=schema)


def assign_codes_spark(spark, embeddings_df, cb: Codebook, *, partitions: int,
                       threads_per_task: int = 1):
    """Codes for every row of ``embeddings_df`` (item_id, embedding) as a DataFrame."""

    data = spark.sparkContext.broadcast(cb.to_bytes())
    version = cb.version

    def task(batches):
        yield from assign_batches(batches, cached_codebook(version, data.value, threads_per_task))

    df = by_item(embeddings_df.select("item_id", "embedding"), partitions)
    return df.mapInArrow(task, spark_schema(out_schema()))


def sample_embeddings(df, n_total: int, n_sample: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of a seeded sample of about ``n_sample`` rows (all rows when fewer)."""
    if n_total > n_sample:
        df = df.sample(fraction=min(1.0, 1.1 * n_sample / n_total), seed=seed).limit(n_sample)
    # Sorted by id: the fit must not depend on partition order.
    return ids_and_matrix(df.select("item_id", "embedding").toArrow(), "embedding")


def disambiguate(codes_df):
    """Append to each ``rq`` code the item's rank among the items sharing that full code
    (ordered by item id), making every code unique. Ranks are recomputed on each assignment."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    w = Window.partitionBy("rq").orderBy("item_id")
    return codes_df.withColumn(
        "rq", F.concat("rq", F.array((F.row_number().over(w) - 1).cast("int"))))


@dataclass
class Quantized:
    """Codes for every item of one embeddings table, and the codebook that gave them."""

    codes: "DataFrame"       # item_id, rq, vq, codebook_version
    codebook: Codebook
    #: RQ levels of ``codes.rq`` (a disambiguation level included).
    levels: int
    #: Codebook metrics on the fit sample (``quantizer.metrics.codebook_metrics``).
    metrics: dict
    #: Whether the codebook was fitted now (False: an existing version, assign-only).
    fitted: bool
    sample_size: int
    #: The codebook's artifact folder.
    folder: str


def quantize_embeddings(spark, embeddings, n_rows: int, cfg: QuantizeConfig, codebook_root: str,
                        training_snapshot: str, codebook_version: Optional[str] = None
                        ) -> Quantized:
    """Fit VQ + RQ codebooks on a seeded sample of ``embeddings`` (item_id, embedding; ``n_rows``
    rows) and save them under ``codebook_root``, or load ``codebook_version`` from there; then
    code every item in Spark."""
    emb_ids, vecs = sample_embeddings(embeddings, n_rows, cfg.fit_sample, cfg.rq.seed)
    if codebook_version:
        cb, fitted = Codebook.load(codebook_root, codebook_version), False
    else:
        # codes: auto is sized from the table's item count, not the fit sample's.
        cb = Codebook(ResidualKMeans(resolve_rq(cfg.rq, n_rows)).fit(vecs), NeighbourCodes(cfg.vq).fit(emb_ids, vecs),
                      training_snapshot=training_snapshot)
        cb.version = cb.content_version()
        fitted = True
    rq_codes = cb.rq.encode(vecs)  # the metrics need RQ codes only
    pick = np.random.default_rng(0).choice(len(emb_ids), min(len(emb_ids), cfg.overlap_sample),
                                           replace=False)
    metrics = codebook_metrics(cb.rq, vecs, rq_codes,
                               exact_overlap(cb.vq, emb_ids[pick], vecs[pick]))
    if fitted:
        cb.metrics = metrics
        try:
            cb.save(codebook_root)
        except CodebookExists:   # the same content was fitted before: that version is it
            pass
    codes = assign_codes_spark(spark, embeddings, cb, partitions=cfg.partitions,
                               threads_per_task=cfg.threads_per_task)
    levels = cb.rq.centroids.shape[0]
    if cfg.disambiguate:
        codes = disambiguate(codes)
        levels += 1
    return Quantized(codes, cb, levels, metrics, fitted, len(emb_ids),
                     os.path.join(codebook_root, cb.version))
