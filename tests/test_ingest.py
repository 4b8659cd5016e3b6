"""Ingest quarantines bad rows with a reason, stops on unreadable schemas, and conserves counts."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_store.snapshots import SnapshotStore
from jobs.config import IngestConfig, SourceConfig, load_config
from pipelines.ingest import SchemaError, run_ingest
from pipelines.media import check_image
from pipelines.sources import generic_source
from pipelines.synthetic import _png, _bg

import numpy as np


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


def _ingest(spark, store, source, ingest=None):
    items, events = generic_source(spark, source)
    return run_ingest(spark, store, items, events, source, ingest or IngestConfig(
        image_partitions=2), parents=[], config_hash="t")


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


def test_png_poster_named_jpg_decodes(shared_data):
    data = (shared_data / "ml-posters" / "3575.jpg").read_bytes()
    assert data[:4] == b"\x89PNG"
    assert check_image(data, 10_000_000, 8) == (None, None)


def test_single_process_ingest_agrees_with_spark_on_a_corrupted_world(spark, tmp_path):
    import importlib.util

    from pipelines import synthetic as syn
    from pipelines.ingest_local import ingest_local

    spec = importlib.util.spec_from_file_location(
        "bench_ingest", Path(__file__).resolve().parents[1] / "bench" / "ingest_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = load_config(None, ["world.n_items=150", "world.n_users=30",
                             "world.impressions_per_user=40", "world.video_frames=2"])
    lat = syn.draw_latents(cfg.world)
    events, _ = syn.simulate_events(cfg.world, lat)
    events = bench.corrupt_events(events, 0.05)
    items = pa.concat_tables([bench.corrupt_items(c, 0.05, k) for k, c in
                              enumerate(syn.item_chunks(cfg.world, lat, progress=False))])
    local = ingest_local(items, events, cfg.source, cfg.ingest)
    store = SnapshotStore(str(tmp_path / "s"))
    res = run_ingest(spark, store, spark.createDataFrame(items.to_pandas()),
                     spark.createDataFrame(events.to_pandas()), cfg.source,
                     IngestConfig(image_partitions=2), parents=[], config_hash="x")
    assert local.counts == res.counts
    assert local.quarantine_reasons == res.quarantine_reasons
    assert {"events.unknown_item", "events.invalid_label", "events.duplicate_key",
            "items.undecodable_image"} <= set(res.quarantine_reasons)
    spark_items = store.read_arrow("items").sort_by("item_id")
    assert spark_items.column("title").to_pylist() == \
        local.items.sort_by("item_id").column("title").to_pylist()
