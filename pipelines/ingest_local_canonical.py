"""The canonical raw shape of the single-process ingest: the pandas twins of
:mod:`pipelines.ingest_canonical` (``canonical_items`` / ``canonical_events``), with the same
columns, the same type dispatch, the same ``SchemaError`` for a column that cannot mean what its
name says, and values parsed and rendered as Spark does."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.config import SourceConfig
from pipelines.ingest_canonical import SchemaError
from pipelines.ingest_rules import label_mode_of


class LocalIngestUnsupported(ValueError):
    """Input the single-process ingest does not read (but the Spark job does)."""


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def is_list_of(t: pa.DataType, element) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and element(t.value_type)


def _require(raw: pa.Table, table: str, cols: list[str]) -> None:
    missing = [c for c in cols if c not in raw.column_names]
    if missing:
        raise SchemaError(f"{table}.{missing[0]} is missing; required columns are "
                          f"{', '.join(cols)}; columns present: {', '.join(raw.column_names)}")


def _trim(arr: pa.ChunkedArray) -> pa.ChunkedArray:
    # Spark's trim strips spaces only, not tabs or newlines.
    return pc.utf8_trim(arr, characters=" ")


def _as_id(raw: pa.Table, table: str, col: str) -> pd.Series:
    arr = raw.column(col)
    t = arr.type
    if _is_string(t):
        arr = _trim(arr)
    elif pa.types.is_integer(t):
        arr = arr.cast(pa.string())
    elif pa.types.is_decimal(t) and t.scale == 0:
        arr = arr.cast(pa.int64()).cast(pa.string())
    else:
        raise SchemaError(f"{table}.{col} is {t}; ids must be strings or integers")
    return arr.to_pandas().astype(object)


def _as_string(raw: pa.Table, table: str, col: str) -> pd.Series:
    if col not in raw.column_names:
        return pd.Series([None] * raw.num_rows, dtype=object)
    arr = raw.column(col)
    if not _is_string(arr.type):
        raise SchemaError(f"{table}.{col} is {arr.type}, expected string")
    return arr.to_pandas().astype(object)


def _spark_double(text: Optional[str]) -> float:
    """A string as Spark's ``try_cast('double')`` reads it (Java's ``Double.parseDouble`` plus
    case-insensitive ``inf`` / ``infinity`` / ``nan``); NaN when it is not a number (the rules
    treat NaN and null alike, as Spark's do)."""
    if text is None:
        return math.nan
    s = text.strip()
    if "_" in s:  # Python reads 1_000, Java does not
        return math.nan
    if len(s) > 1 and s[-1] in "dDfF" and (s[-2].isdigit() or s[-2] == "."):
        s = s[:-1]  # Java's type suffix: 1d, 2.5f
    try:
        return float(s)
    except ValueError:
        return math.nan


def _strings_as_doubles(arr: pa.ChunkedArray) -> np.ndarray:
    values = _trim(arr).to_pandas()
    uniques = pd.unique(values.dropna())
    parsed = {u: _spark_double(u) for u in uniques}
    return values.map(parsed).astype(np.float64).to_numpy()


def _as_number(raw: pa.Table, table: str, col: str) -> pd.Series:
    arr = raw.column(col)
    t = arr.type
    if _is_number(t) or pa.types.is_boolean(t):
        return pd.Series(arr.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    if _is_string(t):
        return pd.Series(_strings_as_doubles(arr), dtype=np.float64)
    raise SchemaError(f"{table}.{col} is {t}, expected a number")


def java_double(x: float, single: bool = False) -> str:
    """A float as Java's ``Double.toString`` (``Float.toString`` when ``single``) writes it, which
    is what Spark's cast to string gives: ``2.0``, ``NaN``, ``1.0E7``."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    if x == 0:
        return "-0.0" if math.copysign(1.0, x) < 0 else "0.0"
    sci = np.format_float_scientific(np.float32(x) if single else x, unique=True, trim="-")
    mantissa, exp_text = sci.split("e")
    sign = "-" if mantissa.startswith("-") else ""
    digits = mantissa.lstrip("-").replace(".", "")
    exp = int(exp_text)
    if 1e-3 <= abs(x) < 1e7:
        if exp >= 0:
            whole = digits[:exp + 1].ljust(exp + 1, "0")
            return f"{sign}{whole}.{digits[exp + 1:] or '0'}"
        return f"{sign}0.{'0' * (-exp - 1)}{digits}"
    return f"{sign}{digits[0]}.{digits[1:] or '0'}E{exp}"


def _spark_time_text(t: datetime) -> str:
    # Spark's cast of a timestamp to string in a UTC session: a fraction only when there is one.
    text = t.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    return text + ("." + f"{t.microsecond:06d}".rstrip("0") if t.microsecond else "")


def spark_string(arr: pa.ChunkedArray) -> pd.Series:
    """Values as Spark's ``cast('string')`` gives them (the ``*_raw`` columns and the details):
    strings unchanged, ``true`` / ``false``, integers in decimal, floats as Java writes them."""
    t = arr.type
    if _is_string(t):
        return arr.to_pandas().astype(object)
    if pa.types.is_boolean(t) or pa.types.is_integer(t):
        return arr.cast(pa.string()).to_pandas().astype(object)
    if pa.types.is_floating(t):
        single = pa.types.is_float32(t) or pa.types.is_float16(t)
        values = np.asarray(arr.cast(pa.float64()).to_numpy(zero_copy_only=False), np.float64)
        valid = pc.is_valid(arr).to_numpy(zero_copy_only=False)
        uniques, inverse = np.unique(values[valid], return_inverse=True)
        texts = np.array([java_double(float(u), single) for u in uniques] or [""], dtype=object)
        out = np.full(len(values), None, dtype=object)
        out[valid] = texts[inverse]
        return pd.Series(out, dtype=object)
    if pa.types.is_timestamp(t):
        arr = pc.cast(arr, pa.timestamp("us", tz="UTC"), safe=False)
        return pd.Series([None if v is None else _spark_time_text(v) for v in arr.to_pylist()],
                         dtype=object)
    return pd.Series([None if v is None else str(v) for v in arr.to_pylist()], dtype=object)


def _utc_us(values: pd.Series) -> pd.Series:
    return values.astype("datetime64[us, UTC]")


def _from_epoch_seconds(seconds: np.ndarray) -> pd.Series:
    # Spark's timestamp_seconds: microseconds truncated toward zero; NaN and infinity give null.
    ok = np.isfinite(seconds) & (np.abs(seconds) < 9.2e12)
    micros = np.trunc(np.where(ok, seconds, 0.0) * 1e6).astype(np.int64)
    out = pd.Series(micros.astype("datetime64[us]")).dt.tz_localize("UTC")
    return out.where(ok)


def parse_timestamp(raw: pa.Table, table: str, col: str,
                    ts_format: Optional[str]) -> pd.Series:
    """The pandas twin of ``pipelines.ingest_canonical.parse_timestamp``: a UTC time per row from a
    timestamp (naive ones are UTC, as in the Spark session), a date, epoch seconds, or an ISO-8601
    / epoch-second string; null where it does not parse."""
    arr = raw.column(col)
    t = arr.type
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return _utc_us(pd.Series(pc.cast(arr, pa.timestamp("us", tz="UTC"), safe=False)
                                 .to_pandas()))
    if _is_number(t):
        return _from_epoch_seconds(arr.cast(pa.float64()).to_numpy(zero_copy_only=False))
    if _is_string(t):
        if ts_format:
            raise LocalIngestUnsupported(
                f"{table}.{col} is a string and source.ts_format is set: the single-process "
                f"ingest reads ISO-8601 and epoch-second strings only; run the Spark ingest")
        text = _trim(arr).to_pandas()
        seconds = _strings_as_doubles(arr)
        iso = pd.to_datetime(text, format="ISO8601", utc=True, errors="coerce")
        epoch = _from_epoch_seconds(seconds)
        return _utc_us(epoch.where(~np.isnan(seconds), _utc_us(pd.Series(iso))))
    raise SchemaError(f"{table}.{col} is {t}; expected a timestamp, epoch seconds "
                      f"or a string; pass source.ts_format for a custom string format")


def canonical_items_frame(raw: pa.Table, source: SourceConfig) -> pd.DataFrame:
    """Raw items → the canonical raw item columns (one row per input row; ``_row`` is its
    position in ``raw``)."""
    _require(raw, "items", ["item_id", "title"])
    n, cols = raw.num_rows, raw.column_names
    none = [None] * n
    tags = none
    if "tags" in cols:
        t = raw.column("tags").type
        if is_list_of(t, _is_string):
            tags = raw.column("tags").to_pylist()
        elif _is_string(t):
            sep = source.tag_separator
            tags = [None if s is None else [p.strip(" ") for p in s.split(sep)
                                            if p.strip(" ") != ""]
                    for s in raw.column("tags").to_pylist()]
        else:
            raise SchemaError(f"items.tags is {t}; expected a list of strings or a "
                              f"'{source.tag_separator}'-separated string")
    image, image_path = none, none
    if "image" in cols:
        t = raw.column("image").type
        if is_binary(t):
            image = raw.column("image").to_pylist()
        elif _is_string(t):
            image_path = raw.column("image").to_pylist()
        else:
            raise SchemaError(f"items.image is {t}; expected encoded bytes or a path")
    if "image_path" in cols:
        given = _as_string(raw, "items", "image_path").tolist()
        image_path = [a if a is not None else b for a, b in zip(image_path, given)]
    video, video_path = none, none
    if "video" in cols:
        t = raw.column("video").type
        if is_list_of(t, is_binary):
            video = raw.column("video").to_pylist()
        elif _is_string(t):
            video_path = raw.column("video").to_pylist()
        else:
            raise SchemaError(f"items.video is {t}; expected a list of encoded frames or a "
                              f"path to a multi-frame file (GIF)")
    created_raw = pd.Series(none, dtype=object)
    created = pd.Series(pd.NaT, index=range(n), dtype="datetime64[us, UTC]")
    if "created_at" in cols:
        created_raw = spark_string(raw.column("created_at"))
        created = parse_timestamp(raw, "items", "created_at", source.ts_format)
    return pd.DataFrame({
        "item_ext": _as_id(raw, "items", "item_id").to_numpy(),
        "title": _as_string(raw, "items", "title").to_numpy(),
        "text": _as_string(raw, "items", "text").to_numpy(),
        "tags": pd.Series(tags, dtype=object).to_numpy(),
        "image": pd.Series(image, dtype=object).to_numpy(),
        "image_path": pd.Series(image_path, dtype=object).to_numpy(),
        "video": pd.Series(video, dtype=object).to_numpy(),
        "video_path": pd.Series(video_path, dtype=object).to_numpy(),
        "created_raw": created_raw.to_numpy(),
        "created_ts": created.array,
        "_row": np.arange(n),
    })


def canonical_events_frame(raw: pa.Table, source: SourceConfig) -> tuple[pd.DataFrame, str]:
    """Raw events → canonical columns and the label mode (``label``, ``rating`` or
    ``implicit``: see :func:`~pipelines.ingest_rules.label_mode_of`)."""
    _require(raw, "events", ["user_id", "item_id", "ts"])
    n = raw.num_rows
    mode = label_mode_of(raw.column_names, source.feedback)
    if mode.column is None:
        value = pd.Series(np.ones(n), dtype=np.float64)
        value_raw = pd.Series(["1"] * n, dtype=object)
    else:
        value = _as_number(raw, "events", mode.column)
        value_raw = spark_string(raw.column(mode.column))
    if "weight" in raw.column_names:
        weight = _as_number(raw, "events", "weight")
        weight_raw = spark_string(raw.column("weight"))
    else:
        weight = pd.Series(np.full(n, np.nan), dtype=np.float64)
        weight_raw = pd.Series([None] * n, dtype=object)
    ts = parse_timestamp(raw, "events", "ts", source.ts_format)
    # The raw ts is only shown for rows whose ts did not parse: format just those.
    raw_ts = pd.Series([None] * n, dtype=object)
    unparsed = np.flatnonzero(ts.isna().to_numpy())
    if len(unparsed):
        raw_ts.iloc[unparsed] = spark_string(raw.column("ts").take(unparsed)).to_numpy()
    frame = pd.DataFrame({
        "user_ext": _as_id(raw, "events", "user_id").to_numpy(),
        "item_ext": _as_id(raw, "events", "item_id").to_numpy(),
        "ts": ts.array,
        "value": value.to_numpy(),
        "value_raw": value_raw.to_numpy(),
        "weight": weight.to_numpy(),
        "weight_raw": weight_raw.to_numpy(),
        "__raw_ts": raw_ts.to_numpy(),
        "_row": np.arange(n),
    })
    return frame, mode.name
