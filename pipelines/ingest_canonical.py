"""The canonical raw shape of the Spark ingest: raw items and events of any supported source
(the generic files, MovieLens, the synthetic world) become one set of columns, or the stage stops
with :class:`SchemaError` naming a column that is missing or cannot mean what its name says.
Every original column is kept as ``__raw_<name>`` for the quarantine record."""

from __future__ import annotations

from typing import Optional

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.config import SourceConfig
from pipelines.ingest_rules import label_mode_of


class SchemaError(ValueError):
    """Raw input cannot be read at all: a required column is missing or has an unusable type."""


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
    """Raw events → canonical columns; returns the frame and the label mode used (``label``,
    ``rating`` or ``implicit``: see :func:`~pipelines.ingest_rules.label_mode_of`)."""
    _require(df, "events", ["user_id", "item_id", "ts"])
    raw = [F.col(c).alias(f"__raw_{c}") for c in df.columns]
    mode = label_mode_of(df.columns, source.feedback)
    if mode.column is None:
        value, value_raw = F.lit(1.0), F.lit("1")
    else:
        value = _as_number(df, "events", mode.column)
        value_raw = F.col(mode.column).cast("string")
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
    return out, mode.name


def canonical_tags(df: DataFrame, source: SourceConfig) -> DataFrame:
    """Raw dated item tags (item_id, tag, ts[, user_id]) → canonical columns: ``item_ext``,
    ``user_ext`` (null when absent), the tag trimmed and lower-cased, ``ts``."""
    _require(df, "item_tags", ["item_id", "tag", "ts"])
    raw = [F.col(c).alias(f"__raw_{c}") for c in df.columns]
    user = (_as_id(df, "item_tags", "user_id") if "user_id" in df.columns
            else F.lit(None).cast("string"))
    return df.select(
        _as_id(df, "item_tags", "item_id").alias("item_ext"),
        user.alias("user_ext"),
        F.lower(F.trim(_as_string(df, "item_tags", "tag"))).alias("tag"),
        parse_timestamp(df, "item_tags", "ts", source.ts_format).alias("ts"),
        *raw,
    )


def _regex_quote(s: str) -> str:
    import re

    return re.escape(s)
