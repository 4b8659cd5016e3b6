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
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa

from mm_encoder.item_encoder import ItemEncoder, MediaError
from pipelines.media import Reason

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

    from pipelines.spark import arrow_schema_to_spark

    df = items_df.select(*INPUT_COLUMNS).repartition(partitions)
    out = df.mapInArrow(task, arrow_schema_to_spark(OUT_SCHEMA))
    return out, lambda: EmbedStats(loads.value, rows_seen.value, peak.value)


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
    from pipelines.spark import arrow_schema_to_spark

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
            feats = batch.column("features").flatten().to_numpy(zero_copy_only=False).reshape(n, -1)
            present = np.asarray(batch.column("present").flatten().to_numpy(
                zero_copy_only=False), dtype=bool).reshape(n, -1)
            with torch.no_grad():
                z = fusion(unpack_features(feats.astype(np.float32), present, dims)).numpy()
            yield pa.RecordBatch.from_arrays([
                batch.column("item_id"),
                pa.FixedSizeListArray.from_arrays(pa.array(z.ravel(), pa.float32()), out_dim)
                .cast(pa.list_(pa.float32())),
                pa.array([version] * n, pa.string())], schema=schema)

    df = features_df.select("item_id", "features", "present").repartition(partitions)
    return df.mapInArrow(task, arrow_schema_to_spark(schema))
