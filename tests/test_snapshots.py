from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest

from feature_store import schemas
from feature_store.facts import EmbeddingFacts, EventsFacts, FactsError
from feature_store.schemas import SchemaMismatch
from feature_store.snapshots import SnapshotNotFound, SnapshotStore

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
    import pyarrow as pa
    from feature_store import schemas
    from feature_store.snapshots import SnapshotStore, SnapshotWriter
    from tests.test_snapshots import EV, _events

    store = SnapshotStore({root!r})
    where = {where!r}
    if where == "publish":
        real = SnapshotWriter._publish
        def slow_publish(self):
            print("READY", flush=True)
            time.sleep(60)
            real(self)
        SnapshotWriter._publish = slow_publish
    with store.writer("events", schema=schemas.events_schema(), facts=EV) as w:
        for part in range(1000):
            w.write_arrow(_events(50, offset=part))
            if where == "data" and part == 2:
                print("READY", flush=True)
                time.sleep(60)
        w.commit()
""")


@pytest.mark.parametrize("where", ["data", "publish"])
def test_killed_writer_leaves_previous_snapshot(tmp_path, where):
    store = SnapshotStore(str(tmp_path))
    before = store.write_table("events", _events(7), schema=schemas.events_schema(), facts=EV)
    script = _KILL_SCRIPT.format(repo=REPO, root=str(tmp_path), where=where)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "READY"  # the writer is mid-snapshot
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    snaps = store.list("events")
    assert [m.snapshot_id for m in snaps] == [before.snapshot_id]
    assert store.get("events").snapshot_id == before.snapshot_id
    assert store.read_arrow("events").num_rows == 7
    # The killed writer's work is in staging, invisible, and can be cleaned up.
    assert store.gc_staging("events") == 1
    assert store.read_arrow("events").num_rows == 7
