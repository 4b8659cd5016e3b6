"""Arrow schemas of every table in the system (DESIGN.md §4), defined once.

Every writer checks its output against these before a snapshot commits; every reader can rely on
them. Ids are int64 inside the system; timestamps are ``timestamp[ms, UTC]``.
"""

from __future__ import annotations

import pyarrow as pa

TS = pa.timestamp("ms", tz="UTC")


class SchemaMismatch(ValueError):
    """A table does not have the columns or types its contract requires."""


def items_schema() -> pa.Schema:
    return pa.schema(
        [
            pa.field("item_id", pa.int64(), nullable=False),
            pa.field("title", pa.string(), nullable=False),
            pa.field("text", pa.string()),
            pa.field("tags", pa.list_(pa.string())),
            # The encoded image exactly as received (PNG/JPEG/...), validated by decoding at ingest.
            pa.field("image", pa.binary()),
            pa.field("image_path", pa.string()),
            # Video as encoded frames (PNG), in time order.
            pa.field("video", pa.list_(pa.binary())),
            pa.field("created_ts", TS),
        ]
    )


def events_schema() -> pa.Schema:
    return pa.schema(
        [
            pa.field("user_id", pa.int64(), nullable=False),
            pa.field("item_id", pa.int64(), nullable=False),
            pa.field("ts", TS, nullable=False),
            pa.field("label", pa.int8(), nullable=False),
            pa.field("weight", pa.float32()),
        ]
    )


#: The parts of the split (``pipelines/split.py``): learning reads only ``train``.
PARTS = ("train", "valid", "test")


def split_events_schema() -> pa.Schema:
    """``events`` with the part of the split each event belongs to."""
    return pa.schema(list(events_schema()) + [pa.field("part", pa.string(), nullable=False)])


def item_tags_schema() -> pa.Schema:
    """Dated item attributes (MovieLens user tags): who wrote which tag on which item, when.
    ``user_id`` is null when the author is unknown or has no events."""
    return pa.schema(
        [
            pa.field("item_id", pa.int64(), nullable=False),
            pa.field("user_id", pa.int64()),
            pa.field("tag", pa.string(), nullable=False),
            pa.field("ts", TS, nullable=False),
        ]
    )


def item_pairs_schema() -> pa.Schema:
    return pa.schema(
        [
            pa.field("src", pa.int64(), nullable=False),
            pa.field("dst", pa.int64(), nullable=False),
            pa.field("score", pa.float32(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
        ]
    )


def item_embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("item_id", pa.int64(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("encoder_version", pa.string(), nullable=False),
        ]
    )


def item_features_schema() -> pa.Schema:
    """Frozen tower features per item (modalities concatenated, see the manifest's ``dims``)."""
    return pa.schema(
        [
            pa.field("item_id", pa.int64(), nullable=False),
            pa.field("features", pa.list_(pa.float32()), nullable=False),
            pa.field("present", pa.list_(pa.bool_()), nullable=False),
        ]
    )


def content_hashes_schema() -> pa.Schema:
    """Per embedded item, the hash of the content it was embedded from (the daily job embeds
    only items whose hash changed)."""
    return pa.schema([pa.field("item_id", pa.int64(), nullable=False),
                      pa.field("content_hash", pa.string(), nullable=False)])


def item_codes_schema(levels: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("item_id", pa.int64(), nullable=False),
            pa.field("rq", pa.list_(pa.int32(), levels), nullable=False),
            pa.field("vq", pa.list_(pa.int32()), nullable=False),
            pa.field("codebook_version", pa.string(), nullable=False),
        ]
    )


def examples_schema(levels: int, raw_codes: bool = True) -> pa.Schema:
    """Ranker examples (``train_examples`` / ``eval_examples``): one impression with its label,
    the user's history before it and the target's codes. ``*_raw`` columns hold the codes fitted
    on the unaligned embeddings (the ``codes_raw`` arm; empty when that arm is off); ``frozen`` is
    the content embedding for the cascade arm (empty when off)."""
    rq = pa.list_(pa.int32(), levels)
    # Without raw codes the *_raw columns are all null: variable-size lists then, because
    # Parquet cannot round-trip a null fixed-size list (pyarrow reads it back as a bad size).
    rq_raw = rq if raw_codes else pa.list_(pa.int32())
    return pa.schema(
        [
            pa.field("user_id", pa.int64(), nullable=False),
            pa.field("item_id", pa.int64(), nullable=False),
            pa.field("ts", TS, nullable=False),
            pa.field("label", pa.int8(), nullable=False),
            # The part of the split the example belongs to (train, valid, test).
            pa.field("part", pa.string(), nullable=False),
            # The target item has no event in the training part (new, or never shown before).
            pa.field("cold", pa.bool_(), nullable=False),
            # The user has no event in the training part.
            pa.field("new_user", pa.bool_(), nullable=False),
            # A negative drawn by the sampler (implicit feedback), not an observed impression.
            pa.field("sampled", pa.bool_(), nullable=False),
            # The user's last N positives strictly before ``ts``, oldest first.
            pa.field("hist_item_ids", pa.list_(pa.int64()), nullable=False),
            pa.field("hist_rq", pa.list_(rq), nullable=False),
            pa.field("rq", rq, nullable=False),
            pa.field("vq", pa.list_(pa.int32()), nullable=False),
            pa.field("hist_rq_raw", pa.list_(rq_raw)),
            pa.field("rq_raw", rq_raw),
            pa.field("vq_raw", pa.list_(pa.int32())),
            pa.field("frozen", pa.list_(pa.float32())),
            # The target's tags as the pretrain stage's tagger predicts them, as indices into the
            # examples facts' ``pred_tag_vocab`` (empty when no tagger ran).
            pa.field("pred_tags", pa.list_(pa.int32())),
        ]
    )


#: The examples columns each prediction row carries (which impression it scores).
PREDICTION_KEYS = ("user_id", "item_id", "ts", "label", "part", "cold", "new_user", "sampled")


def predictions_schema() -> pa.Schema:
    """Scores of the validation and test examples by each trained ranker arm and baseline."""
    examples = examples_schema(1)
    return pa.schema(
        [pa.field("arm", pa.string(), nullable=False)]
        + [examples.field(k) for k in PREDICTION_KEYS]
        + [pa.field("score", pa.float32(), nullable=False),
           # The training seed (initialisation and order) of the arm's run.
           pa.field("seed", pa.int32(), nullable=False)]
    )


def candidates_schema() -> pa.Schema:
    """Top-K retrieved items per user (the ``retrieve`` stage's serving tower, from the faiss
    index over its item vectors; the user's own positives never appear)."""
    return pa.schema(
        [
            pa.field("user_id", pa.int64(), nullable=False),
            pa.field("item_id", pa.int64(), nullable=False),
            pa.field("rank", pa.int32(), nullable=False),           # 1 = best
            pa.field("score", pa.float32(), nullable=False),        # cosine
            pa.field("retriever", pa.string(), nullable=False),
        ]
    )


def item_pred_tags_schema() -> pa.Schema:
    """Tags the ``pretrain`` stage's tagger predicts for every item with an image."""
    return pa.schema(
        [
            pa.field("item_id", pa.int64(), nullable=False),
            pa.field("pred_tags", pa.list_(pa.string()), nullable=False),
            pa.field("scores", pa.list_(pa.float32()), nullable=False),
        ]
    )


def quarantine_schema() -> pa.Schema:
    return pa.schema(
        [
            # Which input the row came from ("items", "events", ...).
            pa.field("source_table", pa.string(), nullable=False),
            # Machine-readable reason, one of ``pipelines.ingest.Reason``.
            pa.field("reason", pa.string(), nullable=False),
            # Human detail (the bad value, the decoder's message).
            pa.field("detail", pa.string()),
            # The rejected row as JSON (binary columns replaced by their length).
            pa.field("row", pa.string(), nullable=False),
        ]
    )


def item_video_embeddings_schema() -> pa.Schema:
    """The ``pretrain`` stage's video-text model's vector of every item with a video (the
    action, entity and scene streams, concatenated)."""
    return pa.schema(
        [
            pa.field("item_id", pa.int64(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32()), nullable=False),
        ]
    )


def item_highlights_schema() -> pa.Schema:
    """The ``ground`` stage's moment of each item's video that its title describes, as shares of
    the video ([0, 1]), with the model's score of it."""
    return pa.schema(
        [
            pa.field("item_id", pa.int64(), nullable=False),
            pa.field("highlight_start", pa.float32(), nullable=False),
            pa.field("highlight_end", pa.float32(), nullable=False),
            pa.field("score", pa.float32(), nullable=False),
        ]
    )


def id_map_schema() -> pa.Schema:
    return pa.schema(
        [
            pa.field("external_id", pa.string(), nullable=False),
            pa.field("id", pa.int64(), nullable=False),
        ]
    )


# Tables whose schema does not depend on a size parameter.
FIXED_SCHEMAS = {
    "items": items_schema,
    "events": events_schema,
    "item_pairs": item_pairs_schema,
    "quarantine": quarantine_schema,
    "candidates": candidates_schema,
    "item_pred_tags": item_pred_tags_schema,
    "item_video_embeddings": item_video_embeddings_schema,
    "item_highlights": item_highlights_schema,
    "item_id_map": id_map_schema,
    "user_id_map": id_map_schema,
}


def check_schema(actual: pa.Schema, expected: pa.Schema, table: str) -> None:
    """Raise :class:`SchemaMismatch` naming the first column whose name or type differs.

    Nullability is not compared (Parquet writers from Spark mark every column nullable); the
    non-null contract is enforced by the writers' validation instead.
    """
    for field in expected:
        idx = actual.get_field_index(field.name)
        if idx < 0:
            raise SchemaMismatch(
                f"{table}.{field.name} is missing; expected {field.type}. "
                f"Columns present: {', '.join(actual.names)}"
            )
        got = actual.field(idx).type
        if not _same_type(got, field.type):
            raise SchemaMismatch(f"{table}.{field.name} is {got}, expected {field.type}")
    extra = [n for n in actual.names if expected.get_field_index(n) < 0]
    if extra:
        raise SchemaMismatch(f"{table} has columns not in its contract: {', '.join(extra)}")


def _same_type(a: pa.DataType, b: pa.DataType) -> bool:
    # Parquet round trips turn list item names into "element" and large types may appear.
    if pa.types.is_fixed_size_list(a) and pa.types.is_fixed_size_list(b):
        return a.list_size == b.list_size and _same_type(a.value_type, b.value_type)
    if pa.types.is_fixed_size_list(b) and pa.types.is_list(a):
        # Parquet written by Spark has no fixed-size lists; lengths are checked by the writer
        # and by the cast on read.
        return _same_type(a.value_type, b.value_type)
    if pa.types.is_list(a) and pa.types.is_list(b):
        return _same_type(a.value_type, b.value_type)
    if pa.types.is_timestamp(a) and pa.types.is_timestamp(b):
        return a.unit == b.unit and (a.tz is None) == (b.tz is None)
    return a.equals(b)


def conform(table: pa.Table, expected: pa.Schema, name: str) -> pa.Table:
    """Select and order ``table``'s columns as ``expected`` and cast list/timestamp variants.

    Raises :class:`SchemaMismatch` for a missing column or an incompatible type.
    """
    cols = []
    for field in expected:
        if field.name not in table.column_names:
            raise SchemaMismatch(f"{name}.{field.name} is missing; expected {field.type}")
        col = table.column(field.name)
        if not col.type.equals(field.type):
            if not _same_type(col.type, field.type):
                raise SchemaMismatch(f"{name}.{field.name} is {col.type}, expected {field.type}")
            col = col.cast(field.type)
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=expected)


def spark_schema(schema: pa.Schema):
    """The Spark ``StructType`` of an Arrow schema (the types this project's tables use)."""
    from pyspark.sql import types as T

    def conv(t: pa.DataType):
        if pa.types.is_int64(t):
            return T.LongType()
        if pa.types.is_int32(t):
            return T.IntegerType()
        if pa.types.is_int16(t):
            return T.ShortType()
        if pa.types.is_int8(t):
            return T.ByteType()
        if pa.types.is_float32(t):
            return T.FloatType()
        if pa.types.is_float64(t):
            return T.DoubleType()
        if pa.types.is_boolean(t):
            return T.BooleanType()
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return T.StringType()
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return T.BinaryType()
        if pa.types.is_timestamp(t):
            return T.TimestampType()
        if pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
            return T.ArrayType(conv(t.value_type))
        raise TypeError(f"no Spark type for Arrow {t}")

    return T.StructType([T.StructField(f.name, conv(f.type), f.nullable) for f in schema])
