"""The ingest stage (Spark): raw items and events → validated ``items`` and ``events`` snapshots,
dense int64 id maps, and a ``quarantine`` table with a machine-readable reason per rejected row.

Raw input, whatever its source (the generic file format, MovieLens, the synthetic world), is first
brought to one *canonical raw* shape by :func:`canonical_items` / :func:`canonical_events`; a
column that is missing or of a type that cannot mean what its name says stops the stage with
:class:`SchemaError` naming it. Row-level problems never stop the stage: each bad row goes to
quarantine with the first reason that applies, so ``rows in = rows out + rows quarantined`` for
every input table (checked; :class:`RowAccountingError` otherwise).

Checks, in order (first failure wins):

* items: missing_item_id, missing_title, unparseable_timestamp (``created_at`` given but not a
  time), duplicate_key (same ``item_id``; the earliest created is kept), then media:
  image_not_found, undecodable_image, image_too_large, image_too_small, video_not_found,
  undecodable_video.
* events: missing_user_id, missing_item_id, unparseable_timestamp, invalid_label (not 0/1, NaN) or
  invalid_rating (not a number), invalid_weight, unknown_item (not in the items input),
  item_quarantined (the item was rejected above), duplicate_key (same user, item, ts; the row
  with the highest label is kept).

The transformation functions take and return DataFrames; reading and writing happen only in
:func:`run_ingest`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from feature_store import schemas
from feature_store.snapshots import Manifest, SnapshotNotFound, SnapshotStore
from jobs.config import IngestConfig, SourceConfig
from pipelines.media import Reason, validate_media

log = logging.getLogger(__name__)

ITEM_QUARANTINED = "item_quarantined"


class SchemaError(ValueError):
    """Raw input cannot be read at all: a required column is missing or has an unusable type."""


class RowAccountingError(RuntimeError):
    """Rows in != rows out + rows quarantined: a bug, never a data problem."""


# ------------------------------------------------------------------------- canonical raw shape

ITEM_COLUMNS = ["item_id", "title", "text", "tags", "image", "image_path", "video", "video_path",
                "created_at"]
EVENT_COLUMNS = ["user_id", "item_id", "ts", "label", "rating", "weight"]
_NUMERIC = (T.ByteType, T.ShortType, T.IntegerType, T.LongType, T.FloatType, T.DoubleType,
            T.DecimalType)


def _type_of(df: DataFrame, col: str):
    return df.schema[col].dataType


def _require(df: DataFrame, table: str, cols: list[str]) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise SchemaError(f"{table}.{missing[0]} is missing; required columns are "
                          f"{', '.join(cols)}; columns present: {', '.join(df.columns)}")


def _as_id(df: DataFrame, table: str, col: str):
    t = _type_of(df, col)
    if isinstance(t, T.StringType):
        return F.trim(F.col(col))
    if isinstance(t, (T.ByteType, T.ShortType, T.IntegerType, T.LongType)):
        return F.col(col).cast("string")
    if isinstance(t, T.DecimalType) and t.scale == 0:
        return F.col(col).cast("long").cast("string")
    raise SchemaError(f"{table}.{col} is {t.simpleString()}; ids must be strings or integers")


def _as_string(df: DataFrame, table: str, col: str):
    if col not in df.columns:
        return F.lit(None).cast("string")
    t = _type_of(df, col)
    if isinstance(t, T.StringType):
        return F.col(col)
    raise SchemaError(f"{table}.{col} is {t.simpleString()}, expected string")


def parse_timestamp(df: DataFrame, table: str, col: str, ts_format: Optional[str]):
    """A timestamp column from a timestamp, a date, epoch seconds, or a string (ISO-8601, epoch
    seconds, or ``ts_format``). Unparseable values become null (the caller quarantines them)."""
    t = _type_of(df, col)
    c = F.col(col)
    if isinstance(t, (T.TimestampType, T.TimestampNTZType, T.DateType)):
        return c.cast("timestamp")
    if isinstance(t, _NUMERIC):
        d = c.cast("double")
        return F.when(F.isnan(d), None).otherwise(F.timestamp_seconds(d))
    if isinstance(t, T.StringType):
        s = F.trim(c)
        if ts_format:
            return F.try_to_timestamp(s, F.lit(ts_format))
        num = s.try_cast("double")
        return F.coalesce(F.when(~F.isnan(num), F.timestamp_seconds(num)), F.try_to_timestamp(s))
    raise SchemaError(f"{table}.{col} is {t.simpleString()}; expected a timestamp, epoch seconds "
                      f"or a string; pass source.ts_format for a custom string format")


def _as_number(df: DataFrame, table: str, col: str):
    t = _type_of(df, col)
    if isinstance(t, _NUMERIC):
        return F.col(col).cast("double")
    if isinstance(t, T.BooleanType):
        return F.col(col).cast("double")
    if isinstance(t, T.StringType):
        return F.trim(F.col(col)).try_cast("double")
    raise SchemaError(f"{table}.{col} is {t.simpleString()}, expected a number")


def canonical_items(df: DataFrame, source: SourceConfig) -> DataFrame:
    """Raw items of any supported shape → the canonical raw item columns.

    Keeps every original column under ``__raw_<name>`` for the quarantine record.
    """
    _require(df, "items", ["item_id", "title"])
    raw = [F.col(c).alias(f"__raw_{c}") for c in df.columns]
    tags = F.lit(None).cast("array<string>")
    if "tags" in df.columns:
        t = _type_of(df, "tags")
        if isinstance(t, T.ArrayType) and isinstance(t.elementType, T.StringType):
            tags = F.col("tags")
        elif isinstance(t, T.StringType):
            tags = F.filter(F.transform(F.split(F.col("tags"), _regex_quote(source.tag_separator)),
                                        lambda x: F.trim(x)), lambda x: x != "")
        else:
            raise SchemaError(f"items.tags is {t.simpleString()}; expected a list of strings or a "
                              f"'{source.tag_separator}'-separated string")
    image, image_path = F.lit(None).cast("binary"), F.lit(None).cast("string")
    if "image" in df.columns:
        t = _type_of(df, "image")
        if isinstance(t, T.BinaryType):
            image = F.col("image")
        elif isinstance(t, T.StringType):
            image_path = F.col("image")
        else:
            raise SchemaError(f"items.image is {t.simpleString()}; expected encoded bytes or a path")
    if "image_path" in df.columns:
        image_path = F.coalesce(image_path, _as_string(df, "items", "image_path"))
    video, video_path = F.lit(None).cast("array<binary>"), F.lit(None).cast("string")
    if "video" in df.columns:
        t = _type_of(df, "video")
        if isinstance(t, T.ArrayType) and isinstance(t.elementType, T.BinaryType):
            video = F.col("video")
        elif isinstance(t, T.StringType):
            video_path = F.col("video")
        else:
            raise SchemaError(f"items.video is {t.simpleString()}; expected a list of encoded "
                              f"frames or a path to a multi-frame file (GIF)")
    created_raw = F.lit(None).cast("string")
    created = F.lit(None).cast("timestamp")
    if "created_at" in df.columns:
        created_raw = F.col("created_at").cast("string")
        created = parse_timestamp(df, "items", "created_at", source.ts_format)
    text = _as_string(df, "items", "text")
    return df.select(
        _as_id(df, "items", "item_id").alias("item_ext"),
        _as_string(df, "items", "title").alias("title"),
        text.alias("text"),
        tags.alias("tags"),
        image.alias("image"),
        image_path.alias("image_path"),
        video.alias("video"),
        video_path.alias("video_path"),
        created_raw.alias("created_raw"),
        created.alias("created_ts"),
        *raw,
    )


def canonical_events(df: DataFrame, source: SourceConfig) -> tuple[DataFrame, str]:
    """Raw events → canonical columns; returns the frame and the label mode used
    (``label``, ``rating`` or ``implicit``)."""
    _require(df, "events", ["user_id", "item_id", "ts"])
    raw = [F.col(c).alias(f"__raw_{c}") for c in df.columns]
    if "label" in df.columns:
        mode = "label"
        value = _as_number(df, "events", "label")
    elif "rating" in df.columns:
        mode = "rating"
        value = _as_number(df, "events", "rating")
    else:
        mode = "implicit"
        value = F.lit(1.0)
    value_raw = F.col(mode).cast("string") if mode != "implicit" else F.lit("1")
    weight = _as_number(df, "events", "weight") if "weight" in df.columns else F.lit(None).cast(
        "double")
    weight_raw = F.col("weight").cast("string") if "weight" in df.columns else F.lit(None).cast(
        "string")
    out = df.select(
        _as_id(df, "events", "user_id").alias("user_ext"),
        _as_id(df, "events", "item_id").alias("item_ext"),
        parse_timestamp(df, "events", "ts", source.ts_format).alias("ts"),
        value.alias("value"),
        value_raw.alias("value_raw"),
        weight.alias("weight"),
        weight_raw.alias("weight_raw"),
        *raw,
    )
    return out, mode


def _regex_quote(s: str) -> str:
    import re

    return re.escape(s)


# ------------------------------------------------------------------------- validation


def _first_failure(*checks: tuple) -> tuple:
    """``(condition, reason, detail)`` checks → (reason, detail) columns of the first that holds."""
    reason = F.coalesce(*[F.when(c, F.lit(r)) for c, r, _ in checks])
    detail = F.coalesce(*[F.when(c, d) for c, _, d in checks])
    return reason.cast("string"), detail.cast("string")


def _blank(c):
    return c.isNull() | (F.trim(c) == "")


def classify_items(items: DataFrame, ingest: IngestConfig) -> DataFrame:
    """Add ``_reason`` / ``_detail`` (null for valid rows) to canonical raw items; load images
    given as paths and decode every image and video (in Python workers, batched over Arrow)."""
    reason, detail = _first_failure(
        (_blank(F.col("item_ext")), Reason.MISSING_ITEM_ID, F.lit(None)),
        (_blank(F.col("title")), Reason.MISSING_TITLE, F.lit(None)),
        (F.col("created_raw").isNotNull() & F.col("created_ts").isNull(),
         Reason.UNPARSEABLE_TIMESTAMP, F.col("created_raw")),
    )
    df = items.withColumn("_reason", reason).withColumn("_detail", detail)
    # Among rows still valid, one per item_id: the earliest created (then the smallest title).
    rank = F.when(F.col("_reason").isNull(), F.row_number().over(
        Window.partitionBy("item_ext", F.col("_reason").isNull()).orderBy(
            F.col("created_ts").asc_nulls_last(), "title")))
    df = df.withColumn("_rank", rank)
    df = (df.withColumn("_detail", F.when(F.col("_rank") > 1, F.concat(
        F.lit("item_id "), F.col("item_ext"), F.lit(" seen before"))).otherwise(F.col("_detail")))
          .withColumn("_reason", F.when(F.col("_rank") > 1, F.lit(Reason.DUPLICATE_KEY))
                      .otherwise(F.col("_reason")))
          .drop("_rank"))
    df = df.repartition(ingest.image_partitions)
    max_bytes, min_side = ingest.max_image_bytes, ingest.min_image_side

    def decode(batches):
        for batch in batches:
            cols = batch.to_pydict()
            n = batch.num_rows
            images, videos = list(cols["image"]), list(cols["video"])
            reasons, details = list(cols["_reason"]), list(cols["_detail"])
            for i in range(n):
                if reasons[i] is not None:
                    continue
                img, vid, r, d = validate_media(images[i], cols["image_path"][i], videos[i],
                                                cols["video_path"][i], max_bytes, min_side)
                images[i], videos[i], reasons[i], details[i] = img, vid, r, d
            arrays = []
            for name in batch.schema.names:
                if name == "image":
                    arrays.append(pa.array(images, pa.binary()))
                elif name == "video":
                    arrays.append(pa.array(videos, pa.list_(pa.binary())))
                elif name == "_reason":
                    arrays.append(pa.array(reasons, pa.string()))
                elif name == "_detail":
                    arrays.append(pa.array(details, pa.string()))
                else:
                    arrays.append(batch.column(name))
            yield pa.RecordBatch.from_arrays(arrays, schema=batch.schema)

    return df.mapInArrow(decode, df.schema)


def classify_events(events: DataFrame, mode: str, source: SourceConfig,
                    raw_item_ids: DataFrame, valid_item_ids: DataFrame) -> DataFrame:
    """Add ``_reason`` / ``_detail`` and the parsed ``label`` (int8) to canonical raw events.

    ``raw_item_ids`` holds every item id of the items input (``item_ext``); ``valid_item_ids``
    those that passed validation.
    """
    v = F.col("value")
    if mode == "label":
        bad_value = v.isNull() | F.isnan(v) | ~v.isin(0.0, 1.0)
        label = v
        value_reason = Reason.INVALID_LABEL
    elif mode == "rating":
        bad_value = v.isNull() | F.isnan(v)
        label = (v >= F.lit(source.rating_threshold)).cast("double")
        value_reason = Reason.INVALID_RATING
    else:
        bad_value = F.lit(False)
        label = F.lit(1.0)
        value_reason = Reason.INVALID_LABEL
    known = raw_item_ids.select("item_ext", F.lit(True).alias("_known")).distinct()
    ok_items = valid_item_ids.select("item_ext", F.lit(True).alias("_item_ok"))
    df = events.join(known, "item_ext", "left").join(ok_items, "item_ext", "left")
    w_bad = F.col("weight_raw").isNotNull() & (F.col("weight").isNull() | F.isnan(F.col("weight")))
    reason, detail = _first_failure(
        (_blank(F.col("user_ext")), Reason.MISSING_USER_ID, F.lit(None)),
        (_blank(F.col("item_ext")), Reason.MISSING_ITEM_ID, F.lit(None)),
        (F.col("ts").isNull(), Reason.UNPARSEABLE_TIMESTAMP, F.col("__raw_ts").cast("string")),
        (bad_value, value_reason, F.col("value_raw")),
        (w_bad, Reason.INVALID_WEIGHT, F.col("weight_raw")),
        (F.col("_known").isNull(), Reason.UNKNOWN_ITEM, F.col("item_ext")),
        (F.col("_item_ok").isNull(), ITEM_QUARANTINED, F.col("item_ext")),
    )
    df = (df.withColumn("_reason", reason).withColumn("_detail", detail)
          # Only valid rows get a label; NaN or 2.0 must not reach the (ANSI, failing) cast.
          .withColumn("label", F.when(F.col("_reason").isNull(), label.try_cast("byte")))
          .drop("_known", "_item_ok"))
    rank = F.when(F.col("_reason").isNull(), F.row_number().over(
        Window.partitionBy("user_ext", "item_ext", "ts", F.col("_reason").isNull())
        .orderBy(F.col("label").desc(), F.col("weight").desc_nulls_last())))
    df = df.withColumn("_rank", rank)
    return (df.withColumn("_detail", F.when(F.col("_rank") > 1, F.lit("same user, item, ts"))
                          .otherwise(F.col("_detail")))
            .withColumn("_reason", F.when(F.col("_rank") > 1, F.lit(Reason.DUPLICATE_KEY))
                        .otherwise(F.col("_reason")))
            .drop("_rank"))


def quarantine_rows(classified: DataFrame, table: str) -> DataFrame:
    """The rejected rows as quarantine records: the original row as JSON (binary values replaced
    by their byte length, lists of binary by their length)."""
    raw_cols = [c for c in classified.columns if c.startswith("__raw_")]
    shown = []
    for c in raw_cols:
        name = c[len("__raw_"):]
        t = classified.schema[c].dataType
        if isinstance(t, T.BinaryType):
            shown.append(F.length(F.col(c)).alias(f"{name}_bytes"))
        elif isinstance(t, T.ArrayType) and isinstance(t.elementType, T.BinaryType):
            shown.append(F.size(F.col(c)).alias(f"{name}_frames"))
        else:
            shown.append(F.col(c).alias(name))
    return (classified.where(F.col("_reason").isNotNull())
            .select(F.lit(table).alias("source_table"), F.col("_reason").alias("reason"),
                    F.col("_detail").alias("detail"),
                    F.to_json(F.struct(*shown), {"ignoreNullFields": "false"}).alias("row")))


def assign_dense_ids(spark: SparkSession, external_ids: DataFrame,
                     previous: Optional[DataFrame]) -> DataFrame:
    """Map external string ids to dense int64 ids, keeping every id ``previous`` already gave.

    New ids continue after the largest previous id, in sorted order of the external ids (so the
    same input gives the same ids). Returns the full map (``external_id``, ``id``).
    """
    ids = external_ids.select(F.col("external_id")).distinct()
    offset = 0
    if previous is not None:
        ids = ids.join(previous.select("external_id"), "external_id", "left_anti")
        top = previous.agg(F.max("id")).first()[0]
        offset = 0 if top is None else int(top) + 1
    indexed = ids.orderBy("external_id").rdd.zipWithIndex().map(
        lambda r: (r[0][0], r[1] + offset))
    schema = T.StructType([T.StructField("external_id", T.StringType(), False),
                           T.StructField("id", T.LongType(), False)])
    new = spark.createDataFrame(indexed, schema)
    return new if previous is None else previous.select("external_id", "id").unionByName(new)


# ------------------------------------------------------------------------- the stage


@dataclass
class IngestResult:
    manifests: dict[str, Manifest]
    counts: dict[str, dict[str, int]]
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    label_mode: str = "label"


def run_ingest(spark: SparkSession, store: SnapshotStore, raw_items: DataFrame,
               raw_events: DataFrame, source: SourceConfig, ingest: IngestConfig, *,
               parents: list[str], config_hash: str, stable_ids: bool = True) -> IngestResult:
    """Validate, map ids, and commit ``items``, ``events``, ``quarantine`` and the id maps."""
    from pyspark import StorageLevel

    items = canonical_items(raw_items, source)
    events, mode = canonical_events(raw_events, source)

    items_c = classify_items(items, ingest).persist(StorageLevel.MEMORY_AND_DISK)
    n_items_in = items_c.count()
    valid_items = items_c.where(F.col("_reason").isNull())

    prev_item_map = prev_user_map = None
    if stable_ids:
        prev_item_map = _latest_df(spark, store, "item_id_map")
        prev_user_map = _latest_df(spark, store, "user_id_map")
    item_map = assign_dense_ids(
        spark, valid_items.select(F.col("item_ext").alias("external_id")), prev_item_map
    ).persist(StorageLevel.MEMORY_AND_DISK)

    events_c = classify_events(events, mode, source, items.select("item_ext"),
                               valid_items.select("item_ext")).persist(
        StorageLevel.MEMORY_AND_DISK)
    n_events_in = events_c.count()
    valid_events = events_c.where(F.col("_reason").isNull())
    user_map = assign_dense_ids(
        spark, valid_events.select(F.col("user_ext").alias("external_id")), prev_user_map
    ).persist(StorageLevel.MEMORY_AND_DISK)

    items_out = (valid_items.join(item_map.withColumnRenamed("external_id", "item_ext"), "item_ext")
                 .select(F.col("id").alias("item_id"), "title", "text", "tags", "image",
                         "image_path", "video", F.col("created_ts")))
    events_out = (valid_events
                  .join(F.broadcast(item_map.withColumnRenamed("external_id", "item_ext")
                                    .withColumnRenamed("id", "item_id")), "item_ext")
                  .join(user_map.withColumnRenamed("external_id", "user_ext")
                        .withColumnRenamed("id", "user_id"), "user_ext")
                  .select("user_id", "item_id", "ts", "label",
                          F.col("weight").cast("float").alias("weight"))
                  .sortWithinPartitions("user_id", "ts"))
    quarantine = quarantine_rows(items_c, "items").unionByName(
        quarantine_rows(events_c, "events"))

    manifests = {}
    common = dict(parents=parents, config_hash=config_hash)
    manifests["items"] = write_snapshot(store, "items", items_out, schemas.items_schema(),
                                extra={"rows_in": n_items_in}, **common)
    manifests["events"] = write_snapshot(store, "events", events_out, schemas.events_schema(),
                                 extra={"rows_in": n_events_in, "label_mode": mode}, **common)
    manifests["quarantine"] = write_snapshot(store, "quarantine", quarantine.coalesce(1),
                                     schemas.quarantine_schema(), **common)
    manifests["item_id_map"] = write_snapshot(store, "item_id_map", item_map.coalesce(1),
                                      schemas.id_map_schema(), **common)
    manifests["user_id_map"] = write_snapshot(store, "user_id_map", user_map.coalesce(1),
                                      schemas.id_map_schema(), **common)

    reasons = {f"{r['source_table']}.{r['reason']}": r["count"] for r in
               store.read_spark(spark, "quarantine", manifests["quarantine"].snapshot_id)
               .groupBy("source_table", "reason").count().collect()}
    q_items = sum(v for k, v in reasons.items() if k.startswith("items."))
    q_events = sum(v for k, v in reasons.items() if k.startswith("events."))
    counts = {
        "items": {"in": n_items_in, "out": manifests["items"].row_count, "quarantined": q_items},
        "events": {"in": n_events_in, "out": manifests["events"].row_count,
                   "quarantined": q_events},
    }
    for table, c in counts.items():
        if c["in"] != c["out"] + c["quarantined"]:
            raise RowAccountingError(f"{table}: {c['in']} rows in != {c['out']} out + "
                                     f"{c['quarantined']} quarantined")
    for df in (items_c, events_c, item_map, user_map):
        df.unpersist()
    return IngestResult(manifests, counts, reasons, mode)


def _latest_df(spark, store: SnapshotStore, table: str) -> Optional[DataFrame]:
    try:
        return store.read_spark(spark, table)
    except SnapshotNotFound:
        return None


def write_snapshot(store: SnapshotStore, table: str, df: DataFrame, schema: pa.Schema, *,
           parents, config_hash, extra=None) -> Manifest:
    with store.writer(table, schema=schema, parents=parents, config_hash=config_hash,
                      extra=extra or {}) as w:
        df.write.mode("overwrite").parquet(w.spark_uri)
        return w.commit()
