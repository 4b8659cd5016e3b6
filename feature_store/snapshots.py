"""Versioned, atomically committed Parquet snapshots.

Layout under the store root (a local folder or any URI ``pyarrow.fs`` understands)::

    <root>/<table>/<snapshot_id>/part-*.parquet
    <root>/<table>/<snapshot_id>/_manifest.json
    <root>/<table>/_staging/<snapshot_id>/...        (a writer's work in progress)

A writer fills a private staging folder, writes the manifest last, then publishes the folder with
a single rename. Readers only see folders outside ``_staging`` that hold a manifest, so a writer
killed at any point leaves every earlier snapshot readable and nothing half-written visible. On
object stores without atomic rename the manifest, written last in one PUT, is the commit marker.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import secrets
from typing import Iterable, Sequence, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from feature_store.facts import FactsError, check_facts, facts_from_dict, facts_to_dict
from feature_store.schemas import check_schema, conform, spark_schema

F = TypeVar("F")

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
STAGING = "_staging"


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


def new_snapshot_id() -> str:
    """Sortable by creation time, unique across concurrent writers."""
    now = dt.datetime.now(dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S%f")[:-3] + "-" + secrets.token_hex(3)


def _schema_b64(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


class SnapshotStore:
    """Versioned tables under one root. Thread/process safe for concurrent writers of one table."""

    def __init__(self, root: str):
        self.fs, path = pafs.FileSystem.from_uri(root) if "://" in root else (
            pafs.LocalFileSystem(), os.path.abspath(root))
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
        """Write a Spark DataFrame (its partitions become the files) as a new committed
        snapshot, checked against ``schema``, and return its manifest."""
        with self.writer(table, schema=schema, parents=parents, config_hash=config_hash,
                         facts=facts) as w:
            df.write.mode("overwrite").parquet(w.spark_uri)
            return w.commit()

    # ------------------------------------------------------------------ reading
    def list(self, table: str) -> list[Manifest]:
        """Committed snapshots of ``table``, oldest first."""
        base = self.table_path(table)
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
        except FileNotFoundError:
            return []
        out = []
        for info in infos:
            name = info.base_name
            if info.type != pafs.FileType.Directory or name.startswith("_") or name.startswith("."):
                continue
            m = self._read_manifest(f"{base}/{name}")
            if m is not None:
                out.append(m)
        return sorted(out, key=lambda m: m.snapshot_id)

    def _read_manifest(self, folder: str) -> Manifest | None:
        try:
            with self.fs.open_input_stream(f"{folder}/{MANIFEST}") as f:
                return Manifest.from_json(f.read().decode())
        except (FileNotFoundError, OSError):
            return None

    def get(self, table: str, snapshot_id: str | None = None) -> Manifest:
        """The named snapshot, or the latest committed one when ``snapshot_id`` is None."""
        if snapshot_id is None:
            snaps = self.list(table)
            if not snaps:
                raise SnapshotNotFound(f"table '{table}' has no committed snapshot under {self.root}")
            return snaps[-1]
        m = self._read_manifest(f"{self.table_path(table)}/{snapshot_id}")
        if m is None:
            raise SnapshotNotFound(f"no committed snapshot {table}@{snapshot_id} under {self.root}")
        return m

    def resolve(self, ref: str) -> Manifest:
        """Look up ``table@snapshot_id``."""
        table, _, sid = ref.partition("@")
        return self.get(table, sid or None)

    def exists(self, ref: str) -> bool:
        try:
            self.resolve(ref)
            return True
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

    def gc_staging(self, table: str) -> int:
        """Remove what killed writers left in ``_staging``; returns the folders removed."""
        base = f"{self.table_path(table)}/{STAGING}"
        infos = self.fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
        for info in infos:
            self.fs.delete_dir(info.path)
        return len(infos)


class SnapshotWriter:
    """Collects Parquet files in a staging folder; :meth:`commit` publishes them atomically.

    Spark jobs write into :attr:`spark_uri`; Arrow producers call :meth:`write_arrow`. Used as a
    context manager, an exception (or never calling commit) discards the staging folder.
    """

    def __init__(self, store: SnapshotStore, table: str, *, schema, parents, config_hash, facts):
        self.store, self.table, self.expected = store, table, schema
        self.parents, self.config_hash, self.facts = parents, config_hash, facts
        self.snapshot_id = new_snapshot_id()
        self.staging = f"{store.table_path(table)}/{STAGING}/{self.snapshot_id}"
        self.final = f"{store.table_path(table)}/{self.snapshot_id}"
        store.fs.create_dir(self.staging, recursive=True)
        self._n = 0
        self.committed: Manifest | None = None

    @property
    def spark_uri(self) -> str:
        return self.store.uri_of(self.staging)

    def write_arrow(self, data: pa.Table) -> None:
        if self.expected is not None:
            check_schema(data.schema, self.expected, self.table)
            data = data.select(self.expected.names).cast(self.expected)
        pq.write_table(data, f"{self.staging}/part-{self._n:05d}.parquet",
                       filesystem=self.store.fs, compression="zstd")
        self._n += 1

    def commit(self) -> Manifest:
        fs = self.store.fs
        infos = fs.get_file_info(pafs.FileSelector(self.staging, recursive=False))
        files = sorted(i.base_name for i in infos
                       if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))
        digest = hashlib.sha256()
        rows = 0
        schema = self.expected
        for name in files:
            path = f"{self.staging}/{name}"
            meta = pq.read_metadata(path, filesystem=fs)
            rows += meta.num_rows
            file_schema = meta.schema.to_arrow_schema()
            if self.expected is not None:
                check_schema(file_schema, self.expected, self.table)
            elif schema is None:
                schema = file_schema
            digest.update(name.encode())
            with fs.open_input_stream(path) as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
        if schema is None:
            raise ValueError(f"snapshot of {self.table} has no files and no declared schema")
        manifest = Manifest(
            table=self.table, snapshot_id=self.snapshot_id, path=self.final, files=tuple(files),
            row_count=rows, content_hash=digest.hexdigest(), schema_b64=_schema_b64(schema),
            parents=tuple(self.parents), config_hash=self.config_hash,
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(), facts=self.facts)
        with fs.open_output_stream(f"{self.staging}/{MANIFEST}") as f:
            f.write(manifest.to_json().encode())
        self._publish()
        self.committed = manifest
        log.info("committed %s (%d rows, %d files)", manifest.ref, rows, len(files))
        return manifest

    def _publish(self) -> None:
        # One rename makes the whole folder visible at once.
        self.store.fs.move(self.staging, self.final)

    def abort(self) -> None:
        try:
            self.store.fs.delete_dir(self.staging)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "SnapshotWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.committed is None:
            self.abort()
