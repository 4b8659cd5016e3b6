"""Ingest quarantines bad rows with a reason, stops on unreadable schemas, and conserves counts."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import pipelines.ingest
from feature_store.snapshots import SnapshotNotFound, SnapshotStore
from jobs.config import load_config
from pipelines.config import IngestConfig, SourceConfig
from pipelines.ingest import classify_events, classify_items, run_ingest
from pipelines.ingest_canonical import SchemaError, canonical_events, canonical_items
from pipelines.ingest_local import classify_events_frame, classify_items_frame, ingest_local
from pipelines.ingest_local_canonical import (LocalIngestUnsupported, canonical_events_frame,
                                              canonical_items_frame)
from pipelines.ingest_rules import (EVENT_RULES, ITEM_RULES, Blank, GivenButUnparsed,
                                    KeepOnePerKey, NotAmong, Rule, SortKey, TableRules,
                                    describe_rules)
from pipelines.media import Reason, check_image
from pipelines.sources import generic_source
from pipelines.synthetic import _bg, _png


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture
def corrupted_dataset(tmp_path, shared_data) -> SourceConfig:
    img = tmp_path / "images"
    img.mkdir()
    (img / "good.png").write_bytes(_png(_bg("grass", 32, np.random.default_rng(0))))
    poster = (shared_data / "ml-posters" / "1.jpg").read_bytes()
    (img / "truncated.jpg").write_bytes(poster[: len(poster) * 2 // 5])
    (img / "text.jpg").write_text("this is not an image\n")
    # A real PNG that is named .jpg: the decoder must sniff content.
    shutil.copy(shared_data / "ml-posters" / "3575.jpg", img / "png_named.jpg")
    _write_csv(tmp_path / "items.csv", ["item_id", "title", "tags", "image", "created_at"], [
        ["i1", "Good one", "a|b", "good.png", "2026-01-01T00:00:00Z"],
        ["i2", "Truncated", "a", "truncated.jpg", ""],
        ["i3", "Text file", "", "text.jpg", ""],
        ["i4", "", "a", "good.png", ""],
        ["i5", "Gone", "", "missing.jpg", ""],
        ["i6", "PNG named jpg", "c", "png_named.jpg", "1767225600"],
        ["i1", "Good one again", "a", "good.png", "2026-02-01T00:00:00Z"],
        ["i7", "Bad time", "", "", "not a date"],
        ["i8", "No image", "x|y", "", ""],
        ["", "No id", "", "", ""],
    ])
    _write_csv(tmp_path / "events.csv", ["user_id", "item_id", "ts", "label"], [
        ["u1", "i1", "2026-01-02T00:00:00Z", "1"],
        ["u1", "i6", "2026-01-02T00:00:01Z", "0"],
        ["u2", "i999", "2026-01-02T00:00:00Z", "1"],
        ["u2", "i2", "2026-01-02T00:00:00Z", "1"],
        ["u3", "i1", "yesterday", "1"],
        ["u3", "i1", "2026-01-03T00:00:00Z", "abc"],
        ["u3", "i1", "2026-01-04T00:00:00Z", "NaN"],
        ["u3", "i8", "2026-01-05T00:00:00Z", "2"],
        ["", "i1", "2026-01-02T00:00:00Z", "1"],
        ["u1", "i1", "2026-01-02T00:00:00Z", "0"],
        ["u4", "i8", "1767225600", "1"],
    ])
    return SourceConfig(kind="generic", items=str(tmp_path / "items.csv"),
                        events=str(tmp_path / "events.csv"), images_dir=str(img))


@dataclass
class WrittenIngest:
    """What one Spark ingest wrote: its counts and reasons (the tables are in the store)."""

    counts: dict
    quarantine_reasons: dict
    label_mode: str


def _latest(spark, store: SnapshotStore, table: str):
    try:
        return store.read_spark(spark, table)
    except SnapshotNotFound:
        return None


def _ingest_frames(spark, store: SnapshotStore, raw_items, raw_events, source: SourceConfig,
                   ingest: IngestConfig | None = None) -> WrittenIngest:
    """Run the Spark ingest, keeping the ids of the store's latest maps, and write its five
    tables to ``store`` as the ``ingest`` stage does."""
    frames = run_ingest(spark, raw_items, raw_events, source,
                        ingest or IngestConfig(image_partitions=2),
                        previous_item_map=_latest(spark, store, "item_id_map"),
                        previous_user_map=_latest(spark, store, "user_id_map"))
    manifests = {name: store.write_spark(name, df, schema, parents=[], config_hash="t",
                                         facts=facts)
                 for name, (df, schema, facts) in frames.tables().items()}
    reasons = frames.quarantine_reasons()
    counts = frames.counts({t: manifests[t].row_count for t in ("items", "events")}, reasons)
    frames.release()
    return WrittenIngest(counts, reasons, frames.label_mode)


def _ingest(spark, store, source, ingest=None) -> WrittenIngest:
    items, events, _ = generic_source(spark, source)
    return _ingest_frames(spark, store, items, events, source, ingest)


def test_corrupted_inputs_are_quarantined_with_reasons_and_counts_add_up(
        spark, tmp_path, corrupted_dataset):
    store = SnapshotStore(str(tmp_path / "store"))
    res = _ingest(spark, store, corrupted_dataset)
    assert res.counts["items"] == {"in": 10, "out": 3, "quarantined": 7}
    assert res.counts["events"] == {"in": 11, "out": 3, "quarantined": 8}
    q = store.read_arrow("quarantine").to_pandas()
    by_item = {json.loads(r)["item_id"]: reason for r, reason, t in
               zip(q.row, q.reason, q.source_table) if t == "items"}
    assert by_item == {"i2": "undecodable_image", "i3": "undecodable_image",
                       "i4": "missing_title", "i5": "image_not_found", "i1": "duplicate_key",
                       "i7": "unparseable_timestamp", None: "missing_item_id"}
    ev_reasons = sorted(q[q.source_table == "events"].reason)
    assert ev_reasons == sorted(["unknown_item", "item_quarantined", "unparseable_timestamp",
                                 "invalid_label", "invalid_label", "invalid_label",
                                 "missing_user_id", "duplicate_key"])
    # The kept duplicate is the earliest created; the PNG-named .jpg decoded.
    items = store.read_arrow("items").to_pandas()
    assert sorted(items.title) == ["Good one", "No image", "PNG named jpg"]
    assert items.set_index("title").loc["PNG named jpg", "image"][:4] == b"\x89PNG"
    # Of the u1/i1 duplicate pair, the row with the higher label was kept.
    ev = store.read_arrow("events").to_pandas()
    assert sorted(ev.label.tolist()) == [0, 1, 1]
    assert set(ev.user_id) <= set(store.read_arrow("user_id_map").column("id").to_pylist())


def test_missing_column_stops_with_typed_error_naming_it(spark, tmp_path, corrupted_dataset):
    _write_csv(tmp_path / "items_bad.csv", ["item_id", "name"], [["i1", "x"]])
    source = SourceConfig(**{**corrupted_dataset.__dict__, "items": str(tmp_path / "items_bad.csv")})
    with pytest.raises(SchemaError, match=r"items\.title is missing"):
        _ingest(spark, SnapshotStore(str(tmp_path / "s")), source)


def test_unusable_column_type_stops_with_typed_error(spark, tmp_path, corrupted_dataset):
    pq.write_table(pa.table({"user_id": ["u1"], "item_id": ["i1"], "ts": [b"\x00\x01"],
                             "label": [1]}), tmp_path / "events.parquet")
    source = SourceConfig(**{**corrupted_dataset.__dict__,
                             "events": str(tmp_path / "events.parquet")})
    with pytest.raises(SchemaError, match=r"events\.ts is binary"):
        _ingest(spark, SnapshotStore(str(tmp_path / "s")), source)


def test_string_in_numeric_parquet_column_is_quarantined_not_fatal(spark, tmp_path,
                                                                  corrupted_dataset):
    pq.write_table(pa.table({"user_id": [1, 2], "item_id": ["i1", "i8"],
                             "ts": ["2026-01-02T00:00:00Z", "2026-01-02T00:00:00Z"],
                             "rating": ["4.5", "five"]}), tmp_path / "events.parquet")
    source = SourceConfig(**{**corrupted_dataset.__dict__,
                             "events": str(tmp_path / "events.parquet")})
    store = SnapshotStore(str(tmp_path / "s"))
    res = _ingest(spark, store, source)
    assert res.label_mode == "rating"
    assert res.counts["events"] == {"in": 2, "out": 1, "quarantined": 1}
    assert res.quarantine_reasons["events.invalid_rating"] == 1


def test_ids_stay_stable_when_new_items_arrive(spark, tmp_path, corrupted_dataset):
    store = SnapshotStore(str(tmp_path / "store"))
    _ingest(spark, store, corrupted_dataset)
    first = dict(zip(*store.read_arrow("item_id_map").to_pydict().values()))
    items_csv = Path(corrupted_dataset.items)
    items_csv.write_text(items_csv.read_text() + "i0,Newcomer,,,\n")
    _ingest(spark, store, corrupted_dataset)
    second = dict(zip(*store.read_arrow("item_id_map").to_pydict().values()))
    assert {k: second[k] for k in first} == first
    assert second["i0"] == max(first.values()) + 1


def _nothing_cached(spark) -> bool:
    return spark._jsparkSession.sharedState().cacheManager().isEmpty()


def test_ingest_leaves_nothing_cached_after_release_or_an_error(spark, tmp_path,
                                                              corrupted_dataset):
    from pipelines.accounting import UnusableData

    spark.catalog.clearCache()
    _ingest(spark, SnapshotStore(str(tmp_path / "store")), corrupted_dataset)
    assert _nothing_cached(spark)
    # Every event quarantined: the stage stops after the item map was built and cached.
    _write_csv(Path(corrupted_dataset.events), ["user_id", "item_id", "ts", "label"],
               [["u1", "i1", "2026-01-02T00:00:00Z", "7"]])
    with pytest.raises(UnusableData, match="all 1 events were quarantined"):
        _ingest(spark, SnapshotStore(str(tmp_path / "store2")), corrupted_dataset)
    assert _nothing_cached(spark)


@pytest.mark.parametrize("partitions", [1, 7])
def test_dense_ids_follow_the_sorted_external_ids_across_range_partitions(spark, partitions):
    # Ids spread over several range partitions, and a previous map whose ids have gaps: every
    # previous id is kept, and the new ones are dense after its largest, in sorted order.
    rng = np.random.default_rng(3)
    names = sorted({f"x{v}" for v in rng.integers(0, 10**6, 400)})
    previous = {"x-old-a": 0, names[5]: 3, "x-old-b": 9}
    rows = [(n,) for n in rng.permutation(names + names[:50])]          # duplicates too
    before = spark.conf.get("spark.sql.shuffle.partitions")
    spark.conf.set("spark.sql.shuffle.partitions", str(partitions))
    try:
        ext = spark.createDataFrame(rows, "external_id string")
        prev = spark.createDataFrame(list(previous.items()), "external_id string, id long")
        full, placed = pipelines.ingest.assign_dense_ids(ext, prev)
        got = dict(full.collect())
        placed.unpersist()
        fresh, placed = pipelines.ingest.assign_dense_ids(ext, None)
        got_fresh = dict(fresh.collect())
        placed.unpersist()
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", before)
    new_names = [n for n in names if n not in previous]
    assert got == {**previous, **{n: 10 + k for k, n in enumerate(new_names)}}
    assert got_fresh == {n: k for k, n in enumerate(names)}


def test_png_poster_named_jpg_decodes(shared_data):
    data = (shared_data / "ml-posters" / "3575.jpg").read_bytes()
    assert data[:4] == b"\x89PNG"
    assert check_image(data, 10_000_000, 8) == (None, None)




# ------------------------------------------------------------------ one rule table, two engines


def _load_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_ingest", Path(__file__).resolve().parents[1] / "bench" / "ingest_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _to_spark(spark, table: pa.Table, path: Path):
    """An Arrow table as Spark reads it from Parquet (the typed input both engines accept)."""
    pq.write_table(table, path)
    return spark.read.parquet(path.resolve().as_uri())


def _written(spark, store: SnapshotStore, raw_items: pa.Table, raw_events: pa.Table,
             source: SourceConfig, ingest: IngestConfig, tmp_path: Path) -> WrittenIngest:
    return _ingest_frames(spark, store, _to_spark(spark, raw_items, tmp_path / "items.parquet"),
                          _to_spark(spark, raw_events, tmp_path / "events.parquet"), source,
                          ingest)


def _reason_by_case(quarantine: pa.Table) -> dict[tuple[str, str], tuple[str, str]]:
    """(table, the raw row's ``case``) -> (reason, detail) of each quarantined row."""
    return {(t, json.loads(row)["case"]): (reason, detail) for t, reason, detail, row in zip(
        *quarantine.select(["source_table", "reason", "detail", "row"]).to_pydict().values())}


def _sorted_rows(table: pa.Table, keys: list[str]) -> list[dict]:
    return table.sort_by([(k, "ascending") for k in keys]).to_pylist()


def _png_of(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


#: Images larger than this are quarantined in the every-rule world (the noisy 128 px one is).
MAX_IMAGE_BYTES = 20_000


@pytest.fixture
def every_rule_items(tmp_path) -> pa.Table:
    """Raw items with one row per item check (``case`` names it), media given as bytes and as
    paths."""
    rng = np.random.default_rng(0)
    media = tmp_path / "media"
    media.mkdir()
    good = _png(_bg("grass", 32, rng))
    (media / "good.png").write_bytes(good)
    # Decodes, but its frames are too small to be a video (an undecodable file's message would
    # name a memory address, which differs between the two engines' processes).
    Image.new("RGB", (4, 4)).save(media / "tiny.gif")
    frames = [_bg(kind, 24, rng) for kind in ("sky", "sand")]
    frames[0].save(media / "moving.gif", save_all=True, append_images=frames[1:])
    huge = _png_of(rng.integers(0, 256, (128, 128, 3)))
    assert len(huge) > MAX_IMAGE_BYTES > len(good)
    tiny = _png_of(np.full((4, 4, 3), 200))
    rows = [  # case, item_id, title, tags, image, image_path, video, created_at
        ("kept", "i1", "Good", "a|b", good, None, None, "2026-01-01T00:00:00Z"),
        ("later_duplicate", "i1", "Good again", "a", good, None, None, "2026-02-01T00:00:00Z"),
        ("no_id", None, "No id", None, None, None, None, None),
        ("blank_id", "  ", "Blank id", None, None, None, None, None),
        ("no_title", "i2", "  ", None, None, None, None, None),
        ("no_title_bad_time", "i12", "", None, None, None, None, "soon"),
        ("bad_time", "i3", "Bad time", None, None, None, None, "not a date"),
        ("truncated", "i4", "Truncated", None, good[: len(good) // 2], None, None, None),
        ("tiny", "i5", "Tiny", None, tiny, None, None, None),
        ("huge", "i6", "Huge", None, huge, None, None, None),
        ("lost_image", "i7", "Lost image", None, None, str(media / "missing.png"), None, None),
        ("lost_video", "i8", "Lost video", None, None, None, str(media / "missing.gif"), None),
        ("tiny_video", "i9", "Tiny video", None, None, None, str(media / "tiny.gif"), None),
        ("moving", " i10 ", "Moving", " x | y |", None, str(media / "good.png"),
         str(media / "moving.gif"), "1767225600"),
        ("plain", "i11", "Plain", None, None, None, None, None),
    ]
    names = ["case", "item_id", "title", "tags", "image", "image_path", "video", "created_at"]
    types = [pa.string(), pa.string(), pa.string(), pa.string(), pa.binary(), pa.string(),
             pa.string(), pa.string()]
    return pa.table([pa.array(list(col), t) for col, t in zip(zip(*rows), types)],
                    schema=pa.schema(list(zip(names, types))))


EXPECTED_ITEM_REASONS = {
    "later_duplicate": Reason.DUPLICATE_KEY, "no_id": Reason.MISSING_ITEM_ID,
    "blank_id": Reason.MISSING_ITEM_ID, "no_title": Reason.MISSING_TITLE,
    "no_title_bad_time": Reason.MISSING_TITLE, "bad_time": Reason.UNPARSEABLE_TIMESTAMP,
    "truncated": Reason.UNDECODABLE_IMAGE, "tiny": Reason.IMAGE_TOO_SMALL,
    "huge": Reason.IMAGE_TOO_LARGE, "lost_image": Reason.IMAGE_NOT_FOUND,
    "lost_video": Reason.VIDEO_NOT_FOUND, "tiny_video": Reason.UNDECODABLE_VIDEO,
}

T1, T2, T3 = "2026-01-02T00:00:00Z", "2026-01-03T00:00:00Z", "2026-01-04T00:00:00Z"


def every_rule_events(mode: str) -> pa.Table:
    """Raw events with one row per event check under label ``mode`` (``case`` names it). The
    value column is typed per mode: ``label`` a float (2.0, NaN), ``rating`` a string ("five",
    null); ``weight`` a string in label mode ("heavy"), a float otherwise (NaN)."""
    rows = [  # case, user_id, item_id, ts, label, rating, weight
        ("kept", "u1", "i1", T1, 1.0, "5", 0.5),
        ("lower_duplicate", "u1", "i1", T1, 0.0, "2", 0.25),
        ("no_user", None, "i1", T1, 1.0, "5", None),
        ("blank_user", "  ", "i1", T1, 1.0, "5", None),
        ("no_item", "u1", None, T1, 1.0, "5", None),
        ("bad_ts", "u1", "i1", "yesterday", 1.0, "5", None),
        ("bad_value", "u2", "i1", T2, 2.0, "five", None),
        ("nan_value", "u2", "i1", T3, math.nan, None, None),
        ("bad_weight", "u2", "i11", T1, 1.0, "4", "bad"),
        ("unknown_item", "u2", "i999", T1, 1.0, "4", None),
        ("quarantined_item", "u3", "i4", T1, 1.0, "4", None),
        ("epoch_ts", " u3 ", "i10", "1767225600", 0.0, "3.5", None),
        ("negative", "u4", "i11", T2, 0.0, " 1 ", 1.0),
    ]
    case, user, item, ts, label, rating, weight = (list(c) for c in zip(*rows))
    cols = {"case": pa.array(case), "user_id": pa.array(user, pa.string()),
            "item_id": pa.array(item, pa.string()), "ts": pa.array(ts)}
    if mode == "label":
        cols["label"] = pa.array(label, pa.float64())
        cols["weight"] = pa.array([{"bad": "heavy"}.get(w, None if w is None else str(w))
                                   for w in weight], pa.string())
    else:
        if mode == "rating":
            cols["rating"] = pa.array(rating, pa.string())
        cols["weight"] = pa.array([math.nan if w == "bad" else w for w in weight], pa.float64())
    return pa.table(cols)


EXPECTED_EVENT_REASONS = {
    "lower_duplicate": Reason.DUPLICATE_KEY, "no_user": Reason.MISSING_USER_ID,
    "blank_user": Reason.MISSING_USER_ID, "no_item": Reason.MISSING_ITEM_ID,
    "bad_ts": Reason.UNPARSEABLE_TIMESTAMP, "bad_weight": Reason.INVALID_WEIGHT,
    "unknown_item": Reason.UNKNOWN_ITEM, "quarantined_item": Reason.ITEM_QUARANTINED,
}
VALUE_REASONS = {"label": {"bad_value": Reason.INVALID_LABEL, "nan_value": Reason.INVALID_LABEL},
                 "rating": {"bad_value": Reason.INVALID_RATING,
                            "nan_value": Reason.INVALID_RATING},
                 "implicit": {}}


@pytest.mark.parametrize("mode", ["label", "rating", "implicit"])
def test_local_and_spark_ingest_agree_row_by_row_on_every_rule(spark, tmp_path, every_rule_items,
                                                               mode):
    raw_events = every_rule_events(mode)
    source, ingest = SourceConfig(), IngestConfig(max_image_bytes=MAX_IMAGE_BYTES,
                                                  image_partitions=2)
    local = ingest_local(every_rule_items, raw_events, source, ingest)
    store = SnapshotStore(str(tmp_path / "store"))
    written = _written(spark, store, every_rule_items, raw_events, source, ingest, tmp_path)

    # The same reason (and detail) for the same rejected row.
    by_case = _reason_by_case(local.quarantine)
    assert _reason_by_case(store.read_arrow("quarantine")) == by_case
    assert {c: r for (t, c), (r, _) in by_case.items() if t == "items"} == EXPECTED_ITEM_REASONS
    assert {c: r for (t, c), (r, _) in by_case.items() if t == "events"} == \
        {**EXPECTED_EVENT_REASONS, **VALUE_REASONS[mode]}
    assert by_case["items", "later_duplicate"][1] == "item_id i1 seen before"
    assert by_case["events", "bad_ts"][1] == "yesterday"
    # Every rule of the table fired, and no reason outside it.
    for table, rules in (("items", ITEM_RULES), ("events", EVENT_RULES)):
        assert {r for (t, _), (r, _) in by_case.items() if t == table} == \
            set(rules.reasons(mode))
    # The same rows kept, with the same dense ids.
    assert local.label_mode == written.label_mode == mode
    assert local.counts == written.counts
    assert local.quarantine_reasons == written.quarantine_reasons
    for name, keys in (("item_id_map", ["id"]), ("user_id_map", ["id"]), ("items", ["item_id"]),
                       ("events", ["user_id", "item_id", "ts"])):
        assert _sorted_rows(getattr(local, name), keys) == \
            _sorted_rows(store.read_arrow(name), keys), name
    assert local.item_id_map.column("external_id").to_pylist() == ["i1", "i10", "i11"]
    # u2's events all fail, except the two whose only fault is their label or rating.
    assert local.user_id_map.column("external_id").to_pylist() == \
        (["u1", "u2", "u3", "u4"] if mode == "implicit" else ["u1", "u3", "u4"])
    moving = [r for r in local.items.to_pylist() if r["title"] == "Moving"][0]
    assert moving["tags"] == ["x", "y"] and len(moving["video"]) == 2
    assert moving["image"] == (tmp_path / "media" / "good.png").read_bytes()
    # Of the u1/i1 duplicates the positive (higher weight when both are positive) is kept.
    u1 = [(e["item_id"], e["label"], e["weight"]) for e in local.events.to_pylist()
          if e["user_id"] == 0]
    assert u1 == [(0, 1, 0.5)]


def test_a_changed_rule_table_changes_spark_and_local_alike(spark, tmp_path, every_rule_items):
    items_rules = TableRules(
        table="items",
        # Swapped order, and no id check: what a row is blamed for follows the table.
        rules=(Rule(Reason.UNPARSEABLE_TIMESTAMP, GivenButUnparsed("created_raw", "created_ts"),
                    detail="created_raw"),
               Rule(Reason.MISSING_TITLE, Blank("title"), detail="item_ext")),
        keep_one=KeepOnePerKey(key=("item_ext",), order=(SortKey("created_ts", descending=True),),
                               detail="a newer {item_ext} is kept"))
    events_rules = TableRules(
        table="events",
        rules=(Rule(Reason.UNKNOWN_ITEM, NotAmong("item_ext", "raw_item_ids", "the items"),
                    detail="item_ext"),),
        keep_one=KeepOnePerKey(key=("user_ext",),
                               order=(SortKey("ts"), SortKey("label", descending=True)),
                               detail="{user_ext}"))
    raw_events = every_rule_events("label")
    source = SourceConfig()

    items_sp = canonical_items(_to_spark(spark, every_rule_items, tmp_path / "i.parquet"), source)
    events_sp, mode = canonical_events(_to_spark(spark, raw_events, tmp_path / "e.parquet"),
                                       source)
    spark_items = classify_items(items_sp, IngestConfig(), rules=items_rules)
    spark_events = classify_events(events_sp, mode, source, items_sp.select("item_ext"),
                                   spark_items.where("_reason is null").select("item_ext"),
                                   rules=events_rules)

    items_pd = classify_items_frame(canonical_items_frame(every_rule_items, source),
                                    IngestConfig(), rules=items_rules)
    events_pd, _ = canonical_events_frame(raw_events, source)
    events_pd = classify_events_frame(events_pd, mode, source, items_pd["item_ext"],
                                      items_pd.loc[items_pd["_reason"].isna(), "item_ext"],
                                      rules=events_rules)

    def local_reasons(frame, raw):
        cases = raw.column("case").to_pylist()
        return {cases[r]: (reason, detail) for r, reason, detail in
                zip(frame["_row"], frame["_reason"], frame["_detail"]) if reason is not None}

    def spark_reasons(df):
        return {r["__raw_case"]: (r["_reason"], r["_detail"]) for r in
                df.where("_reason is not null").select("__raw_case", "_reason", "_detail")
                .collect()}

    items_local = local_reasons(items_pd, every_rule_items)
    assert spark_reasons(spark_items) == items_local == {
        "no_title": (Reason.MISSING_TITLE, "i2"),
        "no_title_bad_time": (Reason.UNPARSEABLE_TIMESTAMP, "soon"),
        "bad_time": (Reason.UNPARSEABLE_TIMESTAMP, "not a date"),
        "kept": (Reason.DUPLICATE_KEY, "a newer i1 is kept")}
    events_local = local_reasons(events_pd, raw_events)
    assert spark_reasons(spark_events) == events_local
    assert events_local["unknown_item"] == (Reason.UNKNOWN_ITEM, "i999")
    assert {r for r, _ in events_local.values()} == set(events_rules.reasons("label"))


def test_ingest_docstring_lists_the_rule_tables_in_order():
    def words(text: str) -> str:
        return " ".join(text.split())

    assert words(describe_rules()) in words(pipelines.ingest.__doc__)


def test_single_process_ingest_stops_on_the_same_schema_errors(every_rule_items):
    events = every_rule_events("label")
    with pytest.raises(SchemaError, match=r"items\.title is missing"):
        ingest_local(every_rule_items.drop_columns(["title"]), events, SourceConfig(),
                     IngestConfig())
    binary_ts = events.set_column(events.schema.get_field_index("ts"), "ts",
                                  pa.array([b"\x00"] * events.num_rows))
    with pytest.raises(SchemaError, match=r"events\.ts is binary"):
        ingest_local(every_rule_items, binary_ts, SourceConfig(), IngestConfig())


def test_single_process_ingest_refuses_custom_timestamp_formats(every_rule_items):
    with pytest.raises(LocalIngestUnsupported, match=r"run the Spark ingest"):
        ingest_local(every_rule_items, every_rule_events("label"),
                     SourceConfig(ts_format="yyyy-MM-dd"), IngestConfig())


def test_single_process_ingest_agrees_with_spark_on_a_corrupted_world(spark, tmp_path):
    from pipelines import synthetic as syn

    bench = _load_bench()
    cfg = load_config(None, ["world.n_items=150", "world.n_users=30",
                             "world.impressions_per_user=40", "world.video_frames=2"])
    lat = syn.draw_latents(cfg.world)
    events, _ = syn.simulate_events(cfg.world, lat)
    events = bench.corrupt_events(events, 0.05)
    items = pa.concat_tables([bench.corrupt_items(c, 0.05, k) for k, c in
                              enumerate(syn.item_chunks(cfg.world, lat, progress=False))])
    local = ingest_local(items, events, cfg.source, cfg.ingest)
    store = SnapshotStore(str(tmp_path / "s"))
    res = _ingest_frames(spark, store, spark.createDataFrame(items.to_pandas()),
                         spark.createDataFrame(events.to_pandas()), cfg.source,
                         IngestConfig(image_partitions=2))
    assert local.counts == res.counts
    assert local.quarantine_reasons == res.quarantine_reasons
    assert {"events.unknown_item", "events.invalid_label", "events.duplicate_key",
            "items.undecodable_image"} <= set(res.quarantine_reasons)
    spark_items = store.read_arrow("items").sort_by("item_id")
    assert spark_items.column("title").to_pylist() == \
        local.items.sort_by("item_id").column("title").to_pylist()
    assert local.item_id_map.to_pylist() == \
        store.read_arrow("item_id_map").sort_by("id").to_pylist()
