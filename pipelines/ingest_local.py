"""Single-process ingest with pyarrow/pandas: the same checks and the same outcome as the Spark job
in :mod:`pipelines.ingest`, for small inputs and as the benchmark's baseline.

Both are built from the rule tables of :mod:`pipelines.ingest_rules` (this module compiles each
rule to a pandas mask where the Spark job compiles it to a Column), so they quarantine the same
rows for the same reasons, keep the same duplicates, and give the same dense ids, ``counts`` and
``quarantine_reasons``.

It takes typed Arrow input (Parquet, or the synthetic world's raw tables) with the columns the
Spark job accepts: ids as strings or integers; ``created_at`` / ``ts`` as timestamps, dates, epoch
seconds, or ISO-8601 / epoch-second strings; events with a ``label`` column, or a ``rating``
column (positive when >= ``source.rating_threshold``), or neither (implicit feedback: every event
is a positive), and an optional ``weight``. String timestamps in a custom ``source.ts_format``
(a Spark datetime pattern) are read only by the Spark job (``LocalIngestUnsupported``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from feature_store import schemas
from pipelines.accounting import check_rows
from pipelines.config import IngestConfig, SourceConfig
from pipelines.ingest_local_canonical import (canonical_events_frame, canonical_items_frame,
                                              is_binary, is_list_of, java_double)
from pipelines.ingest_rules import EVENT_RULES, ITEM_RULES, KeepOnePerKey, Rule, TableRules, \
    label_mode
from pipelines.media import validate_media


@dataclass
class LocalIngestResult:
    """The five tables the Spark ingest writes, as Arrow tables, with its counts."""

    items: pa.Table
    events: pa.Table
    quarantine: pa.Table
    item_id_map: pa.Table
    user_id_map: pa.Table
    #: Rows in / out / quarantined per input table (``IngestFrames.counts``).
    counts: dict
    #: Quarantined rows per ``<table>.<reason>`` (``IngestFrames.quarantine_reasons``).
    quarantine_reasons: dict
    #: ``label``, ``rating`` or ``implicit``.
    label_mode: str


# ------------------------------------------------------------------------- validation
# The rule tables of pipelines/ingest_rules.py compiled to pandas masks.


def _first_failure(frame: pd.DataFrame, rules: tuple[Rule, ...],
                   id_sets: Mapping[str, pd.Series]) -> tuple[np.ndarray, np.ndarray]:
    """(reason, detail) per row: those of the first rule that holds, None when none does."""
    reason = np.full(len(frame), None, dtype=object)
    detail = np.full(len(frame), None, dtype=object)
    undecided = np.ones(len(frame), dtype=bool)
    for rule in rules:
        hit = undecided & rule.when.pandas(frame, id_sets).to_numpy(dtype=bool)
        reason[hit] = rule.reason
        if rule.detail is not None:
            detail[hit] = frame[rule.detail].to_numpy(dtype=object)[hit]
        undecided &= ~hit
    return reason, detail


def _keep_one_per_key(frame: pd.DataFrame, keep: KeepOnePerKey) -> pd.DataFrame:
    """Mark all but the first row (by ``keep.order``, nulls last) of each key among the
    still-valid rows as ``keep.reason``."""
    valid = frame[frame["_reason"].isna()]
    by = [k.column for k in keep.order]
    ordered = valid[list(dict.fromkeys([*keep.key, *by]))].sort_values(
        by, ascending=[not k.descending for k in keep.order], na_position="last", kind="stable")
    dup = ordered.index[ordered.duplicated(list(keep.key), keep="first").to_numpy()]
    detail = pd.Series("", index=dup, dtype=object)
    for part, is_column in keep.detail_parts():
        detail = detail + (frame.loc[dup, part].astype(str) if is_column else part)
    frame.loc[dup, "_reason"] = keep.reason
    frame.loc[dup, "_detail"] = detail
    return frame


def classify_items_frame(items: pd.DataFrame, ingest: IngestConfig, *,
                         rules: TableRules = ITEM_RULES) -> pd.DataFrame:
    """Add ``_reason`` / ``_detail`` (None for valid rows) to canonical raw items by ``rules``;
    load images given as paths and decode every image and video of the rows still valid."""
    items = items.copy()
    items["_reason"], items["_detail"] = _first_failure(items, rules.rules_for(), {})
    items = _keep_one_per_key(items, rules.keep_one)
    if not rules.media_reasons:
        return items
    images, videos = items["image"].tolist(), items["video"].tolist()
    reasons, details = items["_reason"].tolist(), items["_detail"].tolist()
    paths, video_paths = items["image_path"].tolist(), items["video_path"].tolist()
    for i in range(len(items)):
        if reasons[i] is not None:
            continue
        images[i], videos[i], reasons[i], details[i] = validate_media(
            images[i], paths[i], videos[i], video_paths[i], ingest.max_image_bytes,
            ingest.min_image_side)
    items["image"] = pd.Series(images, index=items.index, dtype=object)
    items["video"] = pd.Series(videos, index=items.index, dtype=object)
    items["_reason"] = pd.Series(reasons, index=items.index, dtype=object)
    items["_detail"] = pd.Series(details, index=items.index, dtype=object)
    return items


def classify_events_frame(events: pd.DataFrame, mode: str, source: SourceConfig,
                          raw_item_ids: pd.Series, valid_item_ids: pd.Series, *,
                          rules: TableRules = EVENT_RULES) -> pd.DataFrame:
    """Add ``_reason`` / ``_detail`` and the parsed ``label`` (float, null for rejected rows) to
    canonical raw events by ``rules`` under label ``mode``; ``raw_item_ids`` / ``valid_item_ids``
    are the id sets of the rules' ``NotAmong`` checks."""
    events = events.copy()
    id_sets = {"raw_item_ids": raw_item_ids, "valid_item_ids": valid_item_ids}
    events["_reason"], events["_detail"] = _first_failure(events, rules.rules_for(mode), id_sets)
    label = label_mode(mode).pandas_label(events["value"], source.rating_threshold)
    events["label"] = label.where(events["_reason"].isna())
    return _keep_one_per_key(events, rules.keep_one)


# ------------------------------------------------------------------------- outputs


def _dense_ids(external: pd.Series) -> pd.DataFrame:
    # Sorted like Spark's orderBy on strings (code point order), numbered from 0.
    ids = np.array(sorted(external.unique()), dtype=object)
    return pd.DataFrame({"external_id": ids, "id": np.arange(len(ids), dtype=np.int64)})


def _shown_rows(rows: pa.Table) -> list[dict]:
    """Raw rows as the quarantine record shows them (like Spark's ``to_json`` of the raw struct):
    binary values as ``<name>_bytes``, lists of binary as ``<name>_frames``, times as ISO-8601
    UTC with milliseconds, non-finite floats as Java writes them (``NaN``)."""
    names, columns = [], []
    for field in rows.schema:
        col, t, name = rows.column(field.name), field.type, field.name
        if is_binary(t):
            name, col = f"{name}_bytes", pc.binary_length(col)
        elif is_list_of(t, is_binary):
            name, col = f"{name}_frames", pc.list_value_length(col)
        elif pa.types.is_timestamp(t):
            col = pc.strftime(pc.cast(col, pa.timestamp("ms", tz="UTC"), safe=False),
                              format="%Y-%m-%dT%H:%M:%SZ")
        elif pa.types.is_date(t) or pa.types.is_decimal(t):
            col = col.cast(pa.string() if pa.types.is_date(t) else pa.float64())
        values = col.to_pylist()
        if pa.types.is_floating(t):
            values = [v if v is None or math.isfinite(v) else java_double(v) for v in values]
        names.append(name)
        columns.append(values)
    return [dict(zip(names, row)) for row in zip(*columns)]


def _quarantine_rows(raw: pa.Table, classified: pd.DataFrame, table: str) -> pd.DataFrame:
    """The rejected rows as quarantine records, like ``pipelines.ingest.quarantine_rows``: the
    original row as JSON (see :func:`_shown_rows`)."""
    bad = classified[classified["_reason"].notna()]
    rows = [json.dumps(r, ensure_ascii=False, default=str)
            for r in _shown_rows(raw.take(bad["_row"].to_numpy()))]
    return pd.DataFrame({"source_table": table, "reason": bad["_reason"].astype(str).to_numpy(),
                         "detail": bad["_detail"].to_numpy(), "row": rows})


def ingest_local(raw_items: pa.Table, raw_events: pa.Table, source: SourceConfig,
                 ingest: IngestConfig) -> LocalIngestResult:
    """Validate raw items and events, quarantine bad rows, and map ids to dense int64 ids (from
    0, in sorted order of the external ids: the Spark job's ids without previous maps)."""
    items = classify_items_frame(canonical_items_frame(raw_items, source), ingest)
    ok_items = items[items["_reason"].isna()]
    item_map = _dense_ids(ok_items["item_ext"])

    events, mode = canonical_events_frame(raw_events, source)
    events = classify_events_frame(events, mode, source, items["item_ext"], ok_items["item_ext"])
    ok_events = events[events["_reason"].isna()]
    user_map = _dense_ids(ok_events["user_ext"])

    iid = pd.Series(item_map["id"].to_numpy(), index=item_map["external_id"].to_numpy())
    uid = pd.Series(user_map["id"].to_numpy(), index=user_map["external_id"].to_numpy())
    items_out = pa.table({
        "item_id": iid[ok_items["item_ext"].to_numpy()].to_numpy(),
        "title": pa.array(ok_items["title"].tolist(), pa.string()),
        "text": pa.array(ok_items["text"].tolist(), pa.string()),
        "tags": pa.array(ok_items["tags"].tolist(), pa.list_(pa.string())),
        "image": pa.array(ok_items["image"].tolist(), pa.binary()),
        "image_path": pa.array(ok_items["image_path"].tolist(), pa.string()),
        "video": pa.array([None if v is None else list(v) for v in ok_items["video"]],
                          pa.list_(pa.binary())),
        "created_ts": pa.array(ok_items["created_ts"]).cast(schemas.TS, safe=False),
    })
    events_out = pa.table({
        "user_id": uid[ok_events["user_ext"].to_numpy()].to_numpy(),
        "item_id": iid[ok_events["item_ext"].to_numpy()].to_numpy(),
        "ts": pa.array(ok_events["ts"]).cast(schemas.TS, safe=False),
        "label": ok_events["label"].to_numpy().astype(np.int8),
        "weight": pa.array(ok_events["weight"].to_numpy(), from_pandas=True).cast(pa.float32()),
    }).sort_by([("user_id", "ascending"), ("ts", "ascending")])

    quarantine = pd.concat([_quarantine_rows(raw_items, items, "items"),
                            _quarantine_rows(raw_events, events, "events")], ignore_index=True)
    reasons = {f"{t}.{r}": int(n) for (t, r), n in
               quarantine.groupby(["source_table", "reason"]).size().items()}
    counts = {}
    for table, frame, ok in (("items", items, ok_items), ("events", events, ok_events)):
        q = sum(v for k, v in reasons.items() if k.startswith(f"{table}."))
        check_rows(f"ingest {table}", len(frame), len(ok), q)
        counts[table] = {"in": len(frame), "out": len(ok), "quarantined": q}
    return LocalIngestResult(
        items_out.cast(schemas.items_schema()), events_out.cast(schemas.events_schema()),
        pa.Table.from_pandas(quarantine, schema=schemas.quarantine_schema(), preserve_index=False),
        pa.Table.from_pandas(item_map, schema=schemas.id_map_schema(), preserve_index=False),
        pa.Table.from_pandas(user_map, schema=schemas.id_map_schema(), preserve_index=False),
        counts, reasons, mode)
