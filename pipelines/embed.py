"""The embed stage (Spark): batch inference of the item encoder over the ``items`` snapshot.

The encoder artifact (config + fusion weights, ~1 MB) is broadcast; the towers' pretrained
weights come from the installed packages (or local paths in the config) on each executor. Each
Python worker process builds the encoder once and keeps it for every task it runs (Spark reuses
Python workers), so the model is loaded once per executor process, never per batch or row. Rows
travel as Arrow batches (``mapInArrow``) and are encoded ``batch_size`` at a time; an item whose
media fails to decode becomes a quarantine row with the reason instead of failing the job.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import numpy as np
import pyarrow as pa

from feature_store.arrays import list_matrix, matrix_column
from feature_store.schemas import spark_schema
from mm_encoder.item_encoder import ItemEncoder, MediaError
from pipelines.config import EmbedConfig
from pipelines.media import Reason
from pipelines.spark import by_item

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

log = logging.getLogger(__name__)

INPUT_COLUMNS = ["item_id", "title", "text", "tags", "image", "video"]
OUT_SCHEMA = pa.schema([
    ("item_id", pa.int64()), ("embedding", pa.list_(pa.float32())),
    ("encoder_version", pa.string()), ("_reason", pa.string()), ("_detail", pa.string()),
    # The frozen tower features (concatenated per modality) and which modalities are present:
    # alignment trains the fusion on these instead of running the towers again.
    ("features", pa.list_(pa.float32())), ("present", pa.list_(pa.bool_())),
])

# One encoder per Python worker process, keyed by version.
_ENCODERS: dict[str, ItemEncoder] = {}


def cached_encoder(version: str, artifact: bytes, threads: int) -> tuple[ItemEncoder, bool]:
    """The process-wide encoder for ``version``; returns (encoder, loaded_now)."""
    import torch

    enc = _ENCODERS.get(version)
    if enc is not None:
        return enc, False
    torch.set_num_threads(threads)
    enc = ItemEncoder.from_bytes(artifact)
    _ENCODERS.clear()  # keep at most one encoder (and its towers) in memory
    _ENCODERS[version] = enc
    return enc, True


def encode_batch(encoder: ItemEncoder, rows: list[dict]) -> tuple[list, list, list, list, list]:
    """Encode rows; returns (embeddings, reasons, details, features, present) per row, with None
    for the rows whose media failed to decode."""
    media, ok_rows, ok_idx = [], [], []
    reasons: list[Optional[str]] = [None] * len(rows)
    details: list[Optional[str]] = [None] * len(rows)
    for i, r in enumerate(rows):
        try:
            media.append(encoder.decode_media(r))
            ok_rows.append(r)
            ok_idx.append(i)
        except MediaError as e:
            reasons[i], details[i] = Reason.UNDECODABLE_IMAGE, str(e)
    out: list = [None] * len(rows)
    feats: list = [None] * len(rows)
    present: list = [None] * len(rows)
    if ok_rows:
        from mm_encoder.item_encoder import pack_features

        emb, f = encoder.encode_with_features(ok_rows, media)
        fv, pv = pack_features(f, encoder.towers.dims())
        for j, i in enumerate(ok_idx):
            out[i], feats[i], present[i] = emb[j], fv[j], pv[j]
    return out, reasons, details, feats, present


def embed_arrow_batches(batches: Iterator[pa.RecordBatch], encoder: ItemEncoder, version: str,
                        batch_size: int) -> Iterator[pa.RecordBatch]:
    """Arrow item batches → Arrow batches of OUT_SCHEMA (the work of one task, or a whole run
    in a single process)."""
    pending: list[dict] = []

    def flush(rows):
        embs, reasons, details, feats, present = encode_batch(encoder, rows)
        return pa.RecordBatch.from_arrays([
            pa.array([r["item_id"] for r in rows], pa.int64()),
            pa.array(embs, pa.list_(pa.float32())),
            pa.array([version] * len(rows), pa.string()),
            pa.array(reasons, pa.string()), pa.array(details, pa.string()),
            pa.array(feats, pa.list_(pa.float32())), pa.array(present, pa.list_(pa.bool_())),
        ], schema=OUT_SCHEMA)

    for batch in batches:
        pending.extend(batch.to_pylist())
        while len(pending) >= batch_size:
            rows, pending = pending[:batch_size], pending[batch_size:]
            yield flush(rows)
    if pending:
        yield flush(pending)


@dataclass
class EmbedStats:
    loads: int
    rows: int
    peak_rss_mb: float


def embed_items_spark(spark, items_df, encoder: ItemEncoder, *, batch_size: int,
                      threads_per_task: int, partitions: int):
    """Run the encoder over ``items_df`` (columns INPUT_COLUMNS) in Spark.

    Returns (DataFrame of OUT_SCHEMA, a function giving :class:`EmbedStats` after an action).
    """
    from pyspark.accumulators import AccumulatorParam

    class MaxParam(AccumulatorParam):
        def zero(self, v):
            return 0.0

        def addInPlace(self, a, b):
            return max(a, b)

    sc = spark.sparkContext
    version = encoder.version
    artifact = sc.broadcast(encoder.to_bytes())
    loads = sc.accumulator(0)
    rows_seen = sc.accumulator(0)
    peak = sc.accumulator(0.0, MaxParam())

    def task(batches):
        enc, loaded = cached_encoder(version, artifact.value, threads_per_task)
        if loaded:
            loads.add(1)
        for out in embed_arrow_batches(batches, enc, version, batch_size):
            rows_seen.add(out.num_rows)
            yield out
        peak.add(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


    df = by_item(items_df.select(*INPUT_COLUMNS), partitions)
    out = df.mapInArrow(task, spark_schema(OUT_SCHEMA))
    return out, lambda: EmbedStats(loads.value, rows_seen.value, peak.value)


@dataclass
class EmbedFrames:
    """The embed job's outputs as DataFrames over one persisted inference result: write them,
    then :meth:`release`."""

    embeddings: "DataFrame"     # item_id, embedding, encoder_version
    features: "DataFrame"       # item_id, features, present
    quarantine: "DataFrame"     # quarantine_schema rows for items whose media failed to decode
    stats: Callable[[], EmbedStats]
    _out: "DataFrame"

    def release(self) -> None:
        self._out.unpersist()


def embed_items(spark, items_df, encoder: ItemEncoder, cfg: EmbedConfig) -> EmbedFrames:
    """Encode every item of ``items_df`` (the ``items`` table) with ``encoder`` in Spark; items
    whose media fails to decode become quarantine rows."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    out, stats = embed_items_spark(spark, items_df, encoder, batch_size=encoder.cfg.batch_size,
                                   threads_per_task=cfg.threads_per_task,
                                   partitions=cfg.partitions)
    out = out.persist(StorageLevel.MEMORY_AND_DISK)
    ok = out.where(F.col("_reason").isNull())
    bad = out.where(F.col("_reason").isNotNull()).select(
        F.lit("items").alias("source_table"), F.col("_reason").alias("reason"),
        F.col("_detail").alias("detail"), F.to_json(F.struct("item_id")).alias("row"))
    return EmbedFrames(ok.select("item_id", "embedding", "encoder_version"),
                       ok.select("item_id", "features", "present"), bad.coalesce(1), stats, out)


# ----------------------------------------------------------------------------- incremental


def with_content_hash(items_df):
    """``items_df`` with ``content_hash``: SHA-256 over everything the encoder reads (title,
    text, tags, the image bytes or path, every video frame), so an item whose content did not
    change keeps its hash from day to day."""
    from pyspark.sql import functions as F

    sep = "\x1f"
    parts = [F.coalesce(F.col("title"), F.lit("")), F.coalesce(F.col("text"), F.lit("")),
             F.coalesce(F.array_join("tags", "\x1e"), F.lit("")),
             F.coalesce(F.sha2(F.col("image"), 256), F.lit("")),
             F.coalesce(F.array_join(F.transform("video", lambda b: F.sha2(b, 256)), ","),
                        F.lit(""))]
    if "image_path" in items_df.columns:
        parts.append(F.coalesce(F.col("image_path"), F.lit("")))
    return items_df.withColumn("content_hash", F.sha2(F.concat_ws(sep, *parts), 256))


@dataclass
class Increment:
    """Today's items split against the previous day's hashes: the items to embed (new or
    changed) and the ids whose embeddings and features carry over."""

    to_embed: "DataFrame"       # items with content_hash
    kept_ids: "DataFrame"       # item_id
    kept: int
    changed: int


def increment(items_df, previous_hashes) -> Increment:
    """Split ``items_df`` (with ``content_hash``) by the previous day's ``item_content_hashes``
    (None: every item is new)."""
    from pyspark.sql import functions as F

    if previous_hashes is None:
        empty = items_df.select("item_id").limit(0)
        return Increment(items_df, empty, 0, 0)
    prev = previous_hashes.select("item_id", F.col("content_hash").alias("_prev_hash"))
    joined = items_df.join(prev, "item_id", "left")
    same = F.col("_prev_hash") == F.col("content_hash")
    kept_ids = joined.where(same).select("item_id")
    to_embed = joined.where(~same | F.col("_prev_hash").isNull()).drop("_prev_hash")
    changed = joined.where(~same).count()
    return Increment(to_embed, kept_ids, kept_ids.count(), changed)


# ----------------------------------------------------------------------------- re-embedding

_FUSIONS: dict[str, object] = {}


def reembed_features_spark(spark, features_df, encoder: ItemEncoder, *, partitions: int,
                           threads_per_task: int = 1):
    """Embed items from their stored tower features with ``encoder``'s fusion head (the towers
    are frozen, so only the fusion runs): the alignment stage's re-embedding of every item.
    Returns a DataFrame (item_id, embedding, encoder_version)."""
    import io

    import torch

    from mm_encoder.item_encoder import FusionHead, unpack_features

    dims = encoder.towers.dims()
    buf = io.BytesIO()
    torch.save(encoder.fusion.state_dict(), buf)
    state = spark.sparkContext.broadcast(buf.getvalue())
    version, out_dim = encoder.version, encoder.cfg.dim
    schema = pa.schema([("item_id", pa.int64()), ("embedding", pa.list_(pa.float32())),
                        ("encoder_version", pa.string())])

    def task(batches):
        fusion = _FUSIONS.get(version)
        if fusion is None:
            torch.set_num_threads(threads_per_task)
            fusion = FusionHead(dims, out_dim)
            fusion.load_state_dict(torch.load(io.BytesIO(state.value), weights_only=True))
            _FUSIONS.clear()
            _FUSIONS[version] = fusion.eval()
        for batch in batches:
            if batch.num_rows == 0:
                continue
            n = batch.num_rows
            feats = list_matrix(batch.column("features"), np.float32)
            present = list_matrix(batch.column("present"), bool)
            with torch.no_grad():
                z = fusion(unpack_features(feats, present, dims)).numpy()
            yield pa.RecordBatch.from_arrays([
                batch.column("item_id"), matrix_column(z.astype(np.float32)),
                pa.array([version] * n, pa.string())], schema=schema)

    df = by_item(features_df.select("item_id", "features", "present"), partitions)
    return df.mapInArrow(task, spark_schema(schema))
