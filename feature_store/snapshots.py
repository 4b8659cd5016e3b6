"""Versioned Parquet snapshots, committed by writing their manifest last.

Layout under the store root (a local folder or a ``pyarrow.fs`` URI, ``s3://`` included)::

    <root>/<table>/<snapshot_id>/part-*.parquet
    <root>/<table>/<snapshot_id>/_manifest.json      (the commit: written last, in one write)

Object stores cannot rename a folder atomically, so nothing is moved: a writer puts its data
files under the snapshot's final prefix and commits by writing ``_manifest.json`` last as one
object (one PUT on S3, an atomic rename on a local disk). Readers ignore a prefix without a
manifest: a killed writer leaves earlier snapshots readable and only an orphan prefix, which
:meth:`SnapshotStore.gc` removes after a grace period. Digests are computed while writing; ids
sort by creation time, so the latest snapshot costs one listing and one manifest read."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import logging
import re
import secrets
import threading
import time
from typing import Iterable, Sequence, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from feature_store.facts import FactsError, check_facts, facts_from_dict, facts_to_dict
from feature_store.parquet_files import (WrittenFile, open_filesystem, spark_arrow_schema,
                                         to_declared, write_parquet, write_partition)
from feature_store.schemas import SchemaMismatch, check_schema, conform, spark_schema

F = TypeVar("F")

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
#: Prefixes without a manifest younger than this may belong to a writer still running; ``gc``
#: leaves them. Keep it longer than the longest snapshot write.
GC_GRACE_S = 24 * 3600.0
#: The time part of a snapshot id (UTC, milliseconds kept).
SNAPSHOT_TIME_FORMAT = "%Y%m%dT%H%M%S%f"
_OBJECT_STORES = ("s3", "gcs", "abfs")


class SnapshotNotFound(LookupError):
    """No committed snapshot matches the request."""


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a committed snapshot is: enough to read it, verify it and trace where it came from."""

    table: str
    snapshot_id: str
    path: str
    files: tuple[str, ...]
    row_count: int
    content_hash: str
    schema_b64: str
    parents: tuple[str, ...]
    config_hash: str
    created_at: str
    #: The typed facts of the snapshot (``feature_store.facts``), None for tables without.
    facts: object = None

    def facts_of(self, kind: type[F]) -> F:
        """The snapshot's facts, checked to be of ``kind``."""
        if not isinstance(self.facts, kind):
            got = "none" if self.facts is None else type(self.facts).__name__
            raise FactsError(f"{self.ref} carries {got} facts, expected {kind.__name__}; if it "
                             "was written by an older qarm, re-run its stage (qarm run --force)")
        return self.facts

    @property
    def schema(self) -> pa.Schema:
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(self.schema_b64)))

    @property
    def ref(self) -> str:
        """``table@snapshot_id``: how other manifests and the DAG state refer to this snapshot."""
        return f"{self.table}@{self.snapshot_id}"

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["facts"] = facts_to_dict(self.facts)
        d["schema"] = self.schema.to_string(show_schema_metadata=False)
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        """Parse a manifest and validate its facts. A manifest written before facts were typed
        (it has ``extra`` instead) reads with no facts; :meth:`facts_of` then says so."""
        d = json.loads(text)
        d.pop("schema", None)
        legacy = "facts" not in d
        d.pop("extra", None)
        d["files"] = tuple(d["files"])
        d["parents"] = tuple(d["parents"])
        d["facts"] = None if legacy else facts_from_dict(d["table"], d["facts"])
        return cls(**d)


_last_ms, _id_lock = [0], threading.Lock()


def new_snapshot_id() -> str:
    """Sortable by creation time, strictly increasing within a process (even within one
    millisecond), unique across concurrent writers."""
    with _id_lock:
        _last_ms[0] = ms = max(int(time.time() * 1000), _last_ms[0] + 1)
    stamp = dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc)
    return stamp.strftime(SNAPSHOT_TIME_FORMAT)[:-3] + "-" + secrets.token_hex(3)


def snapshot_time(snapshot_id: str) -> dt.datetime | None:
    """When the snapshot's writer started (UTC), or None for a name that is not a snapshot id."""
    try:
        born = dt.datetime.strptime(snapshot_id.split("-", 1)[0], SNAPSHOT_TIME_FORMAT)
    except ValueError:
        return None
    return born.replace(tzinfo=dt.timezone.utc)


def _schema_b64(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


class SnapshotStore:
    """Versioned tables under one root. Thread/process safe for concurrent writers of one table."""

    def __init__(self, root: str):
        self.fs, path = open_filesystem(root)
        self.root = path.rstrip("/")
        self.uri = root if "://" in root else self.root
        self.fs.create_dir(self.root, recursive=True)

    # ------------------------------------------------------------------ paths
    def table_path(self, table: str) -> str:
        return f"{self.root}/{table}"

    def uri_of(self, path: str) -> str:
        """A path of this store as a URI Spark can read (file:// for local folders)."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            return "file://" + path
        scheme = self.uri.split("://", 1)[0]
        return f"{scheme}://{path}"

    # ------------------------------------------------------------------ writing
    def writer(self, table: str, *, schema: pa.Schema | None = None, parents: Iterable[str] = (),
               config_hash: str = "", facts=None) -> "SnapshotWriter":
        """A writer for a new snapshot of ``table``; ``facts`` must be the table's facts kind
        (``feature_store.facts.TABLE_FACTS``), or None for a table without facts."""
        check_facts(table, facts)
        return SnapshotWriter(self, table, schema=schema, parents=tuple(parents),
                              config_hash=config_hash, facts=facts)

    def write_table(self, table: str, data: pa.Table, *, schema: pa.Schema | None = None,
                    parents: Iterable[str] = (), config_hash: str = "", facts=None,
                    rows_per_file: int = 1_000_000) -> Manifest:
        """Write one Arrow table as a new committed snapshot and return its manifest."""
        with self.writer(table, schema=schema, parents=parents, config_hash=config_hash,
                         facts=facts) as w:
            for start in range(0, max(data.num_rows, 1), rows_per_file):
                w.write_arrow(data.slice(start, rows_per_file))
            return w.commit()

    def write_spark(self, table: str, df, schema: pa.Schema, *, parents: Iterable[str] = (),
                    config_hash: str = "", facts=None) -> Manifest:
        """Write a Spark DataFrame as a new committed snapshot, checked against ``schema``, and
        return its manifest. Each task writes its partition's file with pyarrow (any ``pyarrow.fs``
        store works); the driver collects the files' row counts and sha256s and commits. Rows
        are sorted within partitions (after a shuffle they arrive in any order), so the same data
        gives the same files and content hash in any run, local or on a cluster."""
        check_schema(spark_arrow_schema(df), schema, table)
        df = df.sortWithinPartitions(*[f.name for f in df.schema.fields
                                       if f.dataType.typeName() != "map"])
        with self.writer(table, schema=schema, parents=parents, config_hash=config_hash,
                         facts=facts) as w:
            write = functools.partial(write_partition, self.uri, w.path, schema, table)
            try:
                rows = df.mapInArrow(write, "file string, rows long, sha256 string").collect()
            except Exception as e:  # a task's SchemaMismatch reaches here as Spark's text
                if found := re.search(r"SchemaMismatch: (.*)", str(e)):
                    raise SchemaMismatch(found.group(1)) from e
                raise
            for r in rows:
                w.add_file(r["file"], WrittenFile(r["rows"], r["sha256"]))
            return w.commit()

    # ------------------------------------------------------------------ reading
    def snapshot_ids(self, table: str) -> list[str]:
        """The snapshot prefixes of ``table``, committed or not, oldest first (one listing)."""
        selector = pafs.FileSelector(self.table_path(table), allow_not_found=True)
        return sorted(i.base_name for i in self.fs.get_file_info(selector)
                      if i.type == pafs.FileType.Directory
                      and not i.base_name.startswith(("_", ".")))

    def list(self, table: str) -> list[Manifest]:
        """Committed snapshots of ``table``, oldest first (reads every manifest)."""
        found = (self._read_manifest(table, sid) for sid in self.snapshot_ids(table))
        return [m for m in found if m is not None]

    def _read_manifest(self, table: str, snapshot_id: str) -> Manifest | None:
        """The snapshot's manifest, None while it has none (not committed)."""
        try:
            with self.fs.open_input_stream(f"{self.table_path(table)}/{snapshot_id}/"
                                           f"{MANIFEST}") as f:
                return Manifest.from_json(f.read().decode())
        except (FileNotFoundError, NotADirectoryError):
            return None

    def get(self, table: str, snapshot_id: str | None = None) -> Manifest:
        """The named snapshot, or the latest committed one when ``snapshot_id`` is None (one
        listing, then manifests newest first until one exists: normally a single read)."""
        if snapshot_id is None:
            for sid in reversed(self.snapshot_ids(table)):
                if (m := self._read_manifest(table, sid)) is not None:
                    return m
            raise SnapshotNotFound(f"table '{table}' has no committed snapshot under {self.root}")
        m = self._read_manifest(table, snapshot_id)
        if m is None:
            raise SnapshotNotFound(f"no committed snapshot {table}@{snapshot_id} under {self.root}")
        return m

    def resolve(self, ref: str) -> Manifest:
        """Look up ``table@snapshot_id``."""
        table, _, sid = ref.partition("@")
        return self.get(table, sid or None)

    def exists(self, ref: str) -> bool:
        try:
            return self.resolve(ref) is not None
        except SnapshotNotFound:
            return False

    def read_arrow(self, table: str, snapshot_id: str | None = None,
                   columns: Sequence[str] | None = None) -> pa.Table:
        m = self.get(table, snapshot_id)
        schema = m.schema
        if columns is not None:
            schema = pa.schema([schema.field(c) for c in columns])
        if not m.files:
            return schema.empty_table()
        parts = [conform(pq.read_table(f"{m.path}/{f}", columns=columns, filesystem=self.fs),
                         schema, table) for f in m.files]
        return pa.concat_tables(parts)

    def read_spark(self, spark, table: str, snapshot_id: str | None = None):
        """The snapshot as a Spark DataFrame (reads only the manifest's files)."""
        m = self.get(table, snapshot_id)
        if not m.files:
            return spark.createDataFrame([], spark_schema(m.schema))
        return spark.read.parquet(*[self.uri_of(f"{m.path}/{f}") for f in m.files])

    def gc(self, table: str, grace_s: float = GC_GRACE_S) -> int:
        """Delete prefixes of ``table`` without a manifest whose snapshot id is over ``grace_s``
        seconds old (killed writers; a running one is younger); returns how many."""
        now = dt.datetime.now(dt.timezone.utc)
        removed = 0
        for sid in self.snapshot_ids(table):
            born, folder = snapshot_time(sid), f"{self.table_path(table)}/{sid}"
            if born is None or (now - born).total_seconds() < grace_s:
                continue
            if self.fs.get_file_info(f"{folder}/{MANIFEST}").type == pafs.FileType.NotFound:
                log.info("gc: removing uncommitted %s@%s (started %s)", table, sid, born)
                self.fs.delete_dir(folder)
                removed += 1
        return removed


class SnapshotWriter:
    """Writes Parquet files under the snapshot's final prefix (:meth:`write_arrow`, or Spark
    tasks and :meth:`add_file`); :meth:`commit` writes the manifest that makes them visible. Used
    as a context manager, leaving without a commit deletes the prefix (best effort)."""

    def __init__(self, store: SnapshotStore, table: str, *, schema, parents, config_hash, facts):
        self.store, self.table, self.expected = store, table, schema
        self.parents, self.config_hash, self.facts = parents, config_hash, facts
        self.snapshot_id = new_snapshot_id()
        self.path = f"{store.table_path(table)}/{self.snapshot_id}"
        if store.fs.type_name not in _OBJECT_STORES:  # object stores have no folders to make
            store.fs.create_dir(self.path, recursive=True)
        self._files: dict[str, WrittenFile] = {}
        self._schema, self.committed = schema, None

    def write_arrow(self, data: pa.Table) -> None:
        """Write ``data`` as the snapshot's next file (checked against the declared schema)."""
        if self.expected is not None:
            check_schema(data.schema, self.expected, self.table)
            data = to_declared(data, self.expected, self.table)
        elif self._schema is None:
            self._schema = data.schema
        name = f"part-{len(self._files):05d}.parquet"
        self.add_file(name, write_parquet(self.store.fs, f"{self.path}/{name}", data.schema,
                                           [data]))

    def add_file(self, name: str, written: WrittenFile) -> None:
        """Register a file written under :attr:`path` by someone else (a Spark task)."""
        self._files[name] = written

    def commit(self) -> Manifest:
        """Write the manifest (the commit) and return it. The content hash covers each file's
        name and sha256 in name order, so the same data written the same way hashes the same."""
        if self._schema is None:
            raise ValueError(f"snapshot of {self.table} has no files and no declared schema")
        files = sorted(self._files)
        digest = hashlib.sha256(b"".join(f"{n}{self._files[n].sha256}".encode() for n in files))
        rows = sum(f.rows for f in self._files.values())
        manifest = Manifest(
            table=self.table, snapshot_id=self.snapshot_id, path=self.path, files=tuple(files),
            row_count=rows, content_hash=digest.hexdigest(), schema_b64=_schema_b64(self._schema),
            parents=tuple(self.parents), config_hash=self.config_hash,
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(), facts=self.facts)
        self._write_manifest(manifest)
        self.committed = manifest
        log.info("committed %s (%d rows, %d files)", manifest.ref, rows, len(files))
        return manifest

    def _write_manifest(self, manifest: Manifest) -> None:
        # An object appears whole or not at all; a local file is visible while it is written,
        # so it is written aside and renamed (atomic).
        fs, final = self.store.fs, f"{self.path}/{MANIFEST}"
        aside = fs.type_name not in _OBJECT_STORES
        target = f"{final}.{secrets.token_hex(4)}.tmp" if aside else final
        with fs.open_output_stream(target) as f:
            f.write(manifest.to_json().encode())
        if aside:
            fs.move(target, final)

    def abort(self) -> None:
        """Delete what this writer wrote (best effort)."""
        try:
            self.store.fs.delete_dir(self.path)
        except OSError as e:
            log.warning("could not delete uncommitted %s (%s); gc will", self.path, e)

    def __enter__(self) -> "SnapshotWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.committed is None:
            self.abort()
