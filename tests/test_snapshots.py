from __future__ import annotations

import collections
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from feature_store import schemas
from feature_store.facts import EmbeddingFacts, EventsFacts, FactsError, ItemsFacts
from feature_store.schemas import SchemaMismatch, spark_schema
from feature_store.snapshots import MANIFEST, SnapshotNotFound, SnapshotStore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EV = EventsFacts(rows_in=0, label_mode="label")


def _events(n: int, offset: int = 0) -> pa.Table:
    return pa.table({
        "user_id": pa.array(range(offset, offset + n), pa.int64()),
        "item_id": pa.array([i % 7 for i in range(n)], pa.int64()),
        "ts": pa.array([1_700_000_000_000 + i for i in range(n)], pa.int64()).cast(schemas.TS),
        "label": pa.array([i % 2 for i in range(n)], pa.int8()),
        "weight": pa.array([1.0] * n, pa.float32()),
    })


def test_round_trip_and_manifest(tmp_path):
    store = SnapshotStore(str(tmp_path))
    m = store.write_table("events", _events(10), schema=schemas.events_schema(),
                          parents=["raw@x"], config_hash="abc", facts=EV)
    assert m.row_count == 10 and m.parents == ("raw@x",) and m.config_hash == "abc"
    assert len(m.content_hash) == 64
    got = store.read_arrow("events", m.snapshot_id)
    assert got.equals(_events(10).cast(schemas.events_schema()))
    on_disk = json.loads(open(os.path.join(m.path, "_manifest.json")).read())
    assert on_disk["row_count"] == 10 and "user_id: int64" in on_disk["schema"]
    assert on_disk["facts"] == {"rows_in": 0, "label_mode": "label"}
    assert store.get("events").facts_of(EventsFacts) == EV


def test_facts_are_typed_on_write_and_validated_on_read(tmp_path):
    store = SnapshotStore(str(tmp_path))
    with pytest.raises(FactsError, match="events needs EventsFacts facts, got EmbeddingFacts"):
        store.write_table("events", _events(2), schema=schemas.events_schema(),
                          facts=EmbeddingFacts(dim=4, encoder_version="v", encoder_artifact="a"))
    with pytest.raises(FactsError, match="events needs EventsFacts facts, got NoneType"):
        store.write_table("events", _events(2), schema=schemas.events_schema())
    m = store.write_table("events", _events(2), schema=schemas.events_schema(), facts=EV)
    with pytest.raises(FactsError, match="carries EventsFacts facts, expected EmbeddingFacts"):
        m.facts_of(EmbeddingFacts)
    # A manifest whose facts do not validate is refused when read, naming the key.
    path = os.path.join(m.path, "_manifest.json")
    doc = json.loads(open(path).read())
    doc["facts"]["label_mode"] = "stars"
    open(path, "w").write(json.dumps(doc))
    with pytest.raises(FactsError, match="events facts.label_mode must be one of"):
        store.get("events", m.snapshot_id)
    doc["facts"] = {"rows_in": 2}
    open(path, "w").write(json.dumps(doc))
    with pytest.raises(FactsError, match="events facts.label_mode' is required"):
        store.get("events", m.snapshot_id)


def test_latest_is_newest_and_versions_are_kept(tmp_path):
    store = SnapshotStore(str(tmp_path))
    a = store.write_table("events", _events(3), schema=schemas.events_schema(), facts=EV)
    b = store.write_table("events", _events(5), schema=schemas.events_schema(), facts=EV)
    assert store.get("events").snapshot_id == b.snapshot_id
    assert store.read_arrow("events", a.snapshot_id).num_rows == 3
    assert [m.snapshot_id for m in store.list("events")] == [a.snapshot_id, b.snapshot_id]


def test_same_content_same_hash(tmp_path):
    store = SnapshotStore(str(tmp_path))
    a = store.write_table("events", _events(20), schema=schemas.events_schema(), facts=EV)
    b = store.write_table("events", _events(20), schema=schemas.events_schema(), facts=EV)
    c = store.write_table("events", _events(20, offset=1), schema=schemas.events_schema(), facts=EV)
    assert a.content_hash == b.content_hash != c.content_hash


def test_schema_is_checked_on_write_and_names_the_column(tmp_path):
    store = SnapshotStore(str(tmp_path))
    bad = _events(3).set_column(0, "user_id", pa.array(["a", "b", "c"]))
    with pytest.raises(SchemaMismatch, match="events.user_id is string, expected int64"):
        store.write_table("events", bad, schema=schemas.events_schema(), facts=EV)
    with pytest.raises(SchemaMismatch, match="events.label is missing"):
        store.write_table("events", _events(3).drop(["label"]), schema=schemas.events_schema(),
                          facts=EV)
    assert store.list("events") == []  # nothing half-written became visible


def test_missing_snapshot_is_a_typed_error(tmp_path):
    store = SnapshotStore(str(tmp_path))
    with pytest.raises(SnapshotNotFound, match="no committed snapshot"):
        store.get("events")


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from feature_store import schemas
    from feature_store.snapshots import SnapshotStore, SnapshotWriter
    from tests.test_snapshots import EV, _events

    store = SnapshotStore({root!r})
    where = {where!r}
    if where == "manifest":  # every data file written, the commit about to happen
        real = SnapshotWriter._write_manifest
        def slow_commit(self, manifest):
            print("READY", flush=True)
            time.sleep(60)
            real(self, manifest)
        SnapshotWriter._write_manifest = slow_commit
    with store.writer("events", schema=schemas.events_schema(), facts=EV) as w:
        for part in range(3):
            w.write_arrow(_events(50, offset=part))
        if where == "data":
            print("READY", flush=True)
            time.sleep(60)
            w.write_arrow(_events(50, offset=3))
        w.commit()
""")


def _kill_writer_mid_snapshot(root: str, where: str) -> None:
    """Start a writer of a new ``events`` snapshot in another process and SIGKILL it once it has
    written 3 data files (``data``) or just before it writes the manifest (``manifest``)."""
    script = _KILL_SCRIPT.format(repo=REPO, root=root, where=where)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "READY"  # the writer is mid-snapshot
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _assert_previous_survives_and_orphan_is_collected(store: SnapshotStore, before) -> None:
    assert [m.snapshot_id for m in store.list("events")] == [before.snapshot_id]
    assert store.get("events").snapshot_id == before.snapshot_id
    assert store.read_arrow("events").equals(_events(7).cast(schemas.events_schema()))
    # The killed writer's files are under its own prefix, which has no manifest.
    orphans = [sid for sid in store.snapshot_ids("events") if sid != before.snapshot_id]
    assert len(orphans) == 1 and orphans[0] > before.snapshot_id
    left = store.fs.get_file_info(pafs.FileSelector(store.table_path("events") + "/" + orphans[0]))
    assert sorted(i.base_name for i in left if i.base_name.endswith(".parquet")) == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert not any(i.base_name == MANIFEST for i in left)
    assert store.gc("events") == 0  # young: it could be a writer still running
    assert store.gc("events", grace_s=0) == 1
    assert store.snapshot_ids("events") == [before.snapshot_id]
    assert store.read_arrow("events").num_rows == 7


@pytest.mark.parametrize("where", ["data", "manifest"])
def test_killed_writer_leaves_previous_snapshot(tmp_path, where):
    store = SnapshotStore(str(tmp_path))
    before = store.write_table("events", _events(7), schema=schemas.events_schema(), facts=EV)
    _kill_writer_mid_snapshot(str(tmp_path), where)
    _assert_previous_survives_and_orphan_is_collected(store, before)


@pytest.mark.parametrize("where", ["data", "manifest"])
def test_killed_writer_leaves_previous_snapshot_on_s3(s3_root, where):
    store = SnapshotStore(s3_root)
    before = store.write_table("events", _events(7), schema=schemas.events_schema(), facts=EV)
    _kill_writer_mid_snapshot(s3_root, where)
    _assert_previous_survives_and_orphan_is_collected(store, before)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_writer_left_without_commit_deletes_its_files(tmp_path, request, backend):
    root = str(tmp_path) if backend == "local" else request.getfixturevalue("s3_root")
    store = SnapshotStore(root)
    with pytest.raises(RuntimeError, match="producer failed"):
        with store.writer("events", schema=schemas.events_schema(), facts=EV) as w:
            w.write_arrow(_events(5))
            raise RuntimeError("producer failed")
    assert store.snapshot_ids("events") == []
    with pytest.raises(SnapshotNotFound):
        store.get("events")


def test_s3_round_trip_writes_data_then_one_manifest_put(s3_root, moto_s3):
    store = SnapshotStore(s3_root)
    mark = len(moto_s3.requests())
    m = store.write_table("events", _events(30), schema=schemas.events_schema(), facts=EV,
                          rows_per_file=10)
    writes = [(verb, path) for verb, path, _ in moto_s3.requests()[mark:]]
    folder = f"/{m.path}/"
    assert writes == [("PUT", folder + f) for f in m.files] + [("PUT", folder + MANIFEST)]
    assert m.files == ("part-00000.parquet", "part-00001.parquet", "part-00002.parquet")
    assert store.read_arrow("events").equals(_events(30).cast(schemas.events_schema()))
    # Digests were taken while writing; they match the bytes the server holds.
    assert m.content_hash == _content_hash(store, m)
    assert store.get("events", m.snapshot_id) == m and store.exists(m.ref)


def _content_hash(store: SnapshotStore, m) -> str:
    """The manifest's content hash recomputed from the stored files' bytes."""
    text = ""
    for name in m.files:
        with store.fs.open_input_stream(f"{m.path}/{name}") as f:
            text += name + hashlib.sha256(f.read()).hexdigest()
    return hashlib.sha256(text.encode()).hexdigest()


def _commit_many(store: SnapshotStore, n: int) -> None:
    """``n`` small committed snapshots of ``events`` (one 1-row file each), 8 writers at a time."""
    def one(i: int) -> None:
        store.write_table("events", _events(1, offset=i), schema=schemas.events_schema(),
                          facts=EV)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(n)))
    time.sleep(0.002)  # ids sort by the millisecond: the next snapshot must be newer than these


def test_latest_among_1000_snapshots_on_s3_takes_one_listing_and_one_manifest(s3_root, moto_s3):
    store = SnapshotStore(s3_root)
    t0 = time.perf_counter()
    _commit_many(store, 999)
    latest = store.write_table("events", _events(3), schema=schemas.events_schema(), facts=EV)
    setup_s = time.perf_counter() - t0
    assert len(store.snapshot_ids("events")) == 1000

    mark = len(moto_s3.requests())
    assert store.get("events").snapshot_id == latest.snapshot_id
    lists, reads = _listings_and_reads(moto_s3.requests()[mark:])
    # One LIST page (1,000 prefixes), then HEAD + GET of the newest manifest only.
    assert len(lists) == 1
    assert reads == [("HEAD", f"/{latest.path}/{MANIFEST}"), ("GET", f"/{latest.path}/{MANIFEST}")]

    # A newer prefix without a manifest (a writer at work) costs one HEAD more, and its 1,001st
    # prefix a second LIST page.
    with store.writer("events", schema=schemas.events_schema(), facts=EV) as w:
        w.write_arrow(_events(2))
        mark = len(moto_s3.requests())
        assert store.get("events").snapshot_id == latest.snapshot_id
        lists2, reads2 = _listings_and_reads(moto_s3.requests()[mark:])
    assert len(lists2) == 2 and reads2 == [("HEAD", f"/{w.path}/{MANIFEST}")] + reads
    print(json.dumps({"backend": "s3", "snapshots": 1000, "setup_s": round(setup_s, 2),
                      "get_latest_requests": len(lists) + len(reads),
                      "requests": ["LIST events/"] * len(lists)
                      + [f"{v} events/{p.split('/events/')[-1]}" for v, p in reads],
                      "with_newer_orphan": len(lists2) + len(reads2)}))


def _listings_and_reads(requests):
    """Split requests logged by moto into LIST pages and the other (method, path) pairs."""
    lists = [(v, p) for v, p, _ in requests if "list-type=2" in p]
    return lists, [(v, p) for v, p, _ in requests if "list-type=2" not in p]


class _CallCounter:
    """The store's real filesystem, counting the calls the store makes through it."""

    def __init__(self, fs):
        self._fs, self.calls = fs, collections.Counter()

    def __getattr__(self, name):
        attr = getattr(self._fs, name)
        if not callable(attr):
            return attr

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return attr(*args, **kwargs)
        return counted


def test_latest_among_1000_snapshots_on_disk_takes_one_listing_and_one_manifest(tmp_path):
    store = SnapshotStore(str(tmp_path))
    t0 = time.perf_counter()
    _commit_many(store, 999)
    latest = store.write_table("events", _events(3), schema=schemas.events_schema(), facts=EV)
    setup_s = time.perf_counter() - t0
    real, store.fs = store.fs, _CallCounter(store.fs)
    try:
        assert store.get("events").snapshot_id == latest.snapshot_id
        get_calls = dict(store.fs.calls)
        store.fs.calls.clear()
        assert len(store.list("events")) == 1000
        list_calls = dict(store.fs.calls)
    finally:
        store.fs = real
    assert get_calls == {"get_file_info": 1, "open_input_stream": 1}
    assert list_calls == {"get_file_info": 1, "open_input_stream": 1000}
    print(json.dumps({"backend": "local", "snapshots": 1000, "setup_s": round(setup_s, 2),
                      "get_latest_calls": get_calls, "list_calls": list_calls}))


# ---------------------------------------------------------------------- Spark writes

def _items(n: int) -> pa.Table:
    """Items with the awkward types: lists of strings and of binaries, binary, nullable
    timestamps, empty and null lists."""
    return pa.table({
        "item_id": pa.array(range(n), pa.int64()),
        "title": [f"t{i}" for i in range(n)],
        "text": [None if i % 3 == 0 else f"text {i}" for i in range(n)],
        "tags": [None if i == 1 else [f"tag{j}" for j in range(i % 3)] for i in range(n)],
        "image": [bytes([i]) * (i + 1) for i in range(n)],
        "image_path": [None] * n,
        "video": [[bytes([i, j]) for j in range(i % 2 + 1)] for i in range(n)],
        "created_ts": pa.array([None if i == 2 else 1_700_000_000_123 + 1000 * i for i in range(n)],
                               pa.int64()).cast(schemas.TS),
    }).cast(schemas.items_schema())


def test_spark_write_round_trips_lists_binary_and_timestamps(spark, tmp_path):
    store = SnapshotStore(str(tmp_path))
    expected = _items(5)
    df = spark.createDataFrame(expected.to_pylist(), spark_schema(expected.schema)).repartition(8)
    sizes = df.rdd.glom().map(len).collect()
    # Spark hands timestamps over in its session time zone; the instants must not move.
    zone = spark.conf.get("spark.sql.session.timeZone")
    spark.conf.set("spark.sql.session.timeZone", "America/New_York")
    try:
        m = store.write_spark("items", df, schemas.items_schema(), facts=ItemsFacts(rows_in=5))
    finally:
        spark.conf.set("spark.sql.session.timeZone", zone)
    # One file per non-empty partition, none for the empty ones.
    assert m.files == tuple(f"part-{i:05d}.parquet" for i, n in enumerate(sizes) if n)
    assert 0 < len(m.files) < 8 and m.row_count == 5
    assert m.content_hash == _content_hash(store, m)  # digests taken while the tasks wrote
    assert store.read_arrow("items").sort_by("item_id").equals(expected)
    assert store.read_spark(spark, "items").count() == 5


def test_spark_write_casts_to_declared_types(spark, tmp_path):
    store = SnapshotStore(str(tmp_path))
    events = _events(6).cast(schemas.events_schema())
    df = spark.createDataFrame(events.to_pylist(), spark_schema(events.schema)).repartition(2)
    m = store.write_spark("events", df, schemas.events_schema(), facts=EV)
    assert store.read_arrow("events", m.snapshot_id).sort_by("user_id").equals(events)
    emb_schema = schemas.item_embeddings_schema(3)
    emb = pa.table({"item_id": pa.array([1, 2], pa.int64()),
                    "embedding": [[0.5, 1.0, 1.5], [2.0, 2.5, 3.0]],
                    "encoder_version": ["v1", "v1"]}).cast(emb_schema)
    facts = EmbeddingFacts(dim=3, encoder_version="v1", encoder_artifact="a")
    m = store.write_spark("item_embeddings", spark.createDataFrame(
        emb.to_pylist(), spark_schema(emb_schema)), emb_schema, facts=facts)
    got = store.read_arrow("item_embeddings", m.snapshot_id).sort_by("item_id")
    assert got.schema.field("embedding").type == pa.list_(pa.float32(), 3) and got.equals(emb)


def test_spark_write_of_empty_dataframe_commits_an_empty_snapshot(spark, tmp_path):
    store = SnapshotStore(str(tmp_path))
    df = spark.createDataFrame([], spark_schema(schemas.events_schema()))
    m = store.write_spark("events", df, schemas.events_schema(), facts=EV)
    assert m.files == () and m.row_count == 0 and store.get("events") == m
    assert store.read_arrow("events").equals(schemas.events_schema().empty_table())
    assert store.read_spark(spark, "events").count() == 0


def test_spark_write_checks_the_schema_and_leaves_nothing(spark, tmp_path):
    from pyspark.sql import functions as F

    store = SnapshotStore(str(tmp_path))
    events = _events(4).cast(schemas.events_schema())
    df = spark.createDataFrame(events.to_pylist(), spark_schema(events.schema))
    with pytest.raises(SchemaMismatch, match="events.user_id is string, expected int64"):
        store.write_spark("events", df.withColumn("user_id", F.col("user_id").cast("string")),
                          schemas.events_schema(), facts=EV)
    with pytest.raises(SchemaMismatch, match="events.label is missing"):
        store.write_spark("events", df.drop("label"), schemas.events_schema(), facts=EV)
    # Nulls in a non-null column are found by the tasks, after some files may be written.
    nulls = df.withColumn("user_id", F.when(F.col("user_id") == 2, None)
                          .otherwise(F.col("user_id")))
    with pytest.raises(SchemaMismatch, match="events.user_id has 1 null values"):
        store.write_spark("events", nulls, schemas.events_schema(), facts=EV)
    assert store.snapshot_ids("events") == []


def test_spark_writes_to_s3_through_pyarrow(spark, s3_root, monkeypatch):
    from tests.s3 import S3_ENV

    # Executors get credentials as on a cluster (spark.executorEnv.*).
    for key, value in S3_ENV.items():
        monkeypatch.setitem(spark.sparkContext.environment, key, value)
    store = SnapshotStore(s3_root)
    events = _events(9).cast(schemas.events_schema())
    df = spark.createDataFrame(events.to_pylist(), spark_schema(events.schema)).repartition(3)
    m = store.write_spark("events", df, schemas.events_schema(), facts=EV)
    assert m.row_count == 9 and m.content_hash == _content_hash(store, m)
    assert store.read_arrow("events").sort_by("user_id").equals(events)
