"""Single-process ingest validation with pyarrow/pandas: the same checks and the same outcome as
the Spark job in :mod:`pipelines.ingest`, for small inputs and as the benchmark's baseline.

It takes raw items/events that are already typed (Parquet with string ids, timestamps, numeric
labels: the synthetic world's raw tables and most Parquet exports); CSV-typed input goes through
the Spark job.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from feature_store import schemas
from jobs.config import IngestConfig, SourceConfig
from pipelines.ingest import ITEM_QUARANTINED, RowAccountingError
from pipelines.media import Reason, validate_media


@dataclass
class LocalIngestResult:
    items: pa.Table
    events: pa.Table
    quarantine: pa.Table
    item_id_map: pa.Table
    user_id_map: pa.Table
    counts: dict
    quarantine_reasons: dict


def _blank(s: pd.Series) -> pd.Series:
    return s.isna() | (s.astype("string").str.strip() == "")


def _dense_ids(external: pd.Series) -> pd.DataFrame:
    ids = np.sort(external.unique())
    return pd.DataFrame({"external_id": ids, "id": np.arange(len(ids), dtype=np.int64)})


def ingest_local(raw_items: pa.Table, raw_events: pa.Table, source: SourceConfig,
                 ingest: IngestConfig) -> LocalIngestResult:
    it = raw_items.to_pandas()
    it["item_ext"] = it["item_id"].astype("string").str.strip()
    reason = pd.Series(pd.NA, index=it.index, dtype="object")
    reason[_blank(it["item_ext"])] = Reason.MISSING_ITEM_ID
    reason[reason.isna() & _blank(it["title"])] = Reason.MISSING_TITLE
    created = pd.to_datetime(it["created_at"], utc=True) if "created_at" in it else None
    it["_reason"] = reason
    # Duplicates among still-valid rows: keep the earliest created, then the smallest title.
    valid = it[it["_reason"].isna()].copy()
    valid["_c"] = created[valid.index] if created is not None else pd.NaT
    valid = valid.sort_values(["_c", "title"], na_position="last", kind="stable")
    dup = valid.duplicated("item_ext", keep="first")
    it.loc[dup[dup].index, "_reason"] = Reason.DUPLICATE_KEY
    images = it["image"].tolist() if "image" in it else [None] * len(it)
    videos = it["video"].tolist() if "video" in it else [None] * len(it)
    for pos, idx in enumerate(it.index):
        if not pd.isna(it.at[idx, "_reason"]):
            continue
        img, vid, r, _ = validate_media(images[pos], None, videos[pos], None,
                                        ingest.max_image_bytes, ingest.min_image_side)
        if r is not None:
            it.at[idx, "_reason"] = r
        images[pos], videos[pos] = img, None if vid is None else list(vid)
    it["image"], it["video"] = images, videos
    ok_items = it[it["_reason"].isna()]
    item_map = _dense_ids(ok_items["item_ext"])

    ev = raw_events.to_pandas()
    ev["user_ext"] = ev["user_id"].astype("string").str.strip()
    ev["item_ext"] = ev["item_id"].astype("string").str.strip()
    value = pd.to_numeric(ev["label"], errors="coerce").astype(float)
    r = pd.Series(pd.NA, index=ev.index, dtype="object")
    checks = [
        (_blank(ev["user_ext"]), Reason.MISSING_USER_ID),
        (_blank(ev["item_ext"]), Reason.MISSING_ITEM_ID),
        (ev["ts"].isna(), Reason.UNPARSEABLE_TIMESTAMP),
        (value.isna() | ~value.isin([0.0, 1.0]), Reason.INVALID_LABEL),
        (~ev["item_ext"].isin(it["item_ext"]), Reason.UNKNOWN_ITEM),
        (~ev["item_ext"].isin(ok_items["item_ext"]), ITEM_QUARANTINED),
    ]
    for cond, why in checks:
        r[r.isna() & cond.fillna(False).astype(bool)] = why
    ev["_reason"] = r
    ev["label"] = value
    ok = ev[ev["_reason"].isna()].sort_values("label", ascending=False, kind="stable")
    dup = ok.duplicated(["user_ext", "item_ext", "ts"], keep="first")
    ev.loc[dup[dup].index, "_reason"] = Reason.DUPLICATE_KEY
    ok_events = ev[ev["_reason"].isna()]
    user_map = _dense_ids(ok_events["user_ext"])

    iid = pd.Series(item_map["id"].values, index=item_map["external_id"].values)
    uid = pd.Series(user_map["id"].values, index=user_map["external_id"].values)
    items_out = pa.table({
        "item_id": iid[ok_items["item_ext"].values].values,
        "title": ok_items["title"].values, "text": ok_items.get("text"),
        "tags": ok_items.get("tags"), "image": ok_items["image"].values,
        "image_path": pa.nulls(len(ok_items), pa.string()),
        "video": pa.array(ok_items["video"].tolist(), pa.list_(pa.binary())),
        "created_ts": pa.array(created[ok_items.index]).cast(schemas.TS)
        if created is not None else pa.nulls(len(ok_items), schemas.TS),
    })
    events_out = pa.table({
        "user_id": uid[ok_events["user_ext"].values].values,
        "item_id": iid[ok_events["item_ext"].values].values,
        "ts": pa.array(ok_events["ts"]).cast(schemas.TS),
        "label": ok_events["label"].astype(np.int8).values,
        "weight": pa.nulls(len(ok_events), pa.float32()),
    })
    q_frames = []
    for name, df, cols in (("items", it, ["item_id", "title"]),
                           ("events", ev, ["user_id", "item_id", "ts"])):
        bad = df[df["_reason"].notna()]
        q_frames.append(pd.DataFrame({
            "source_table": name, "reason": bad["_reason"].astype(str), "detail": None,
            "row": bad[cols].astype(str).to_json(orient="records", lines=True).splitlines()
            if len(bad) else []}))
    quarantine = pd.concat(q_frames, ignore_index=True)
    reasons = {f"{t}.{r}": int(n) for (t, r), n in
               quarantine.groupby(["source_table", "reason"]).size().items()}
    counts = {
        "items": {"in": len(it), "out": len(ok_items), "quarantined": int((it["_reason"].notna()).sum())},
        "events": {"in": len(ev), "out": len(ok_events),
                   "quarantined": int((ev["_reason"].notna()).sum())},
    }
    for table, c in counts.items():
        if c["in"] != c["out"] + c["quarantined"]:
            raise RowAccountingError(f"{table}: {c}")
    return LocalIngestResult(
        items_out.cast(schemas.items_schema()), events_out.cast(schemas.events_schema()),
        pa.Table.from_pandas(quarantine, schema=schemas.quarantine_schema(), preserve_index=False),
        pa.Table.from_pandas(item_map, schema=schemas.id_map_schema(), preserve_index=False),
        pa.Table.from_pandas(user_map, schema=schemas.id_map_schema(), preserve_index=False),
        counts, reasons)
