"""Writing Parquet files whose digest is computed while they are written: from Arrow (the
snapshot writer) and from Spark tasks (each partition written with pyarrow to any
``pyarrow.fs`` store), and the store URIs' filesystems."""

from __future__ import annotations

import hashlib
import itertools
import os
from typing import Iterable, Iterator, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from feature_store.schemas import SchemaMismatch

#: Spark partitions arrive in small Arrow batches; gather them into row groups of about this size.
ROW_GROUP_ROWS = 128 * 1024
ROW_GROUP_BYTES = 64 << 20


def open_filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of a store root: a local folder or a ``pyarrow.fs`` URI such as
    ``s3://bucket/prefix?endpoint_override=host:port&scheme=http`` (credentials: ``AWS_*``)."""
    if "://" not in root:
        return pafs.LocalFileSystem(), os.path.abspath(root)
    if root.startswith("s3://") and "allow_delayed_open" not in root:
        # Small objects (manifests, small parts) then go in one PUT, not a 3-request upload.
        root += ("&" if "?" in root else "?") + "allow_delayed_open=true"
    return pafs.FileSystem.from_uri(root)


def to_declared(data, expected: pa.Schema, table: str):
    """``data`` (a Table or RecordBatch) with ``expected``'s columns, order and types; Spark's
    microseconds in its session time zone become the declared unit and zone (same instants).
    Raises :class:`SchemaMismatch` for nulls in a non-null column or a wrong fixed list size."""
    cols = []
    for field in expected:
        col = data.column(field.name)
        if pa.types.is_timestamp(field.type) and not field.type.equals(col.type):
            col = pc.cast(col, options=pc.CastOptions(field.type, allow_time_truncate=True))
        elif not field.type.equals(col.type) and field.nullable and \
                col.null_count == len(col):
            # All null (an arm that is off): build the nulls in the declared type. pyarrow's
            # cast of an all-null list to a fixed-size list crashes the process.
            col = pa.nulls(len(col), field.type)
        elif not field.type.equals(col.type):
            try:
                col = col.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise SchemaMismatch(f"{table}.{field.name} cannot be {field.type}: {e}") from e
        if not field.nullable and col.null_count:
            raise SchemaMismatch(f"{table}.{field.name} has {col.null_count} null values; the "
                                 "contract says non-null")
        cols.append(col)
    return type(data).from_arrays(cols, schema=expected)


class _HashingSink:
    """A file object over an output stream that hashes the bytes written through it."""

    def __init__(self, stream: pa.NativeFile):
        self._stream, self.sha256, self.closed = stream, hashlib.sha256(), False

    def write(self, data) -> int:
        self.sha256.update(data)
        return self._stream.write(data)

    def flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        self._stream.close()
        self.closed = True


class WrittenFile(NamedTuple):
    rows: int
    sha256: str


def write_parquet(fs: pafs.FileSystem, path: str, schema: pa.Schema,
                   parts: Iterable) -> WrittenFile:
    """Write ``parts`` (tables or batches of ``schema``) as one Parquet file, hashed as written."""
    sink, rows = _HashingSink(fs.open_output_stream(path)), 0
    with pa.PythonFile(sink, mode="w") as f, pq.ParquetWriter(f, schema, compression="zstd") as w:
        for part in parts:
            w.write(part)
            rows += part.num_rows
    return WrittenFile(rows, sink.sha256.hexdigest())


def row_groups(batches: Iterable[pa.RecordBatch], schema: pa.Schema, table: str):
    """Spark's small Arrow batches, cast to ``schema`` and gathered into row groups."""
    pending = []
    for batch in itertools.chain(batches, [None]):  # None: the end, flush what is pending
        if batch is not None and batch.num_rows:
            pending.append(to_declared(batch, schema, table))
        if pending and (batch is None or sum(b.num_rows for b in pending) >= ROW_GROUP_ROWS
                        or sum(b.nbytes for b in pending) >= ROW_GROUP_BYTES):
            yield pa.Table.from_batches(pending)
            pending = []


def write_partition(root: str, folder: str, schema: pa.Schema, table: str,
                     batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """What each Spark task runs (``mapInArrow``): its partition becomes one file under ``folder``
    (a retry overwrites it); yields one row (file, rows, sha256), none for an empty partition."""
    from pyspark import TaskContext

    groups = row_groups(batches, schema, table)
    first = next(groups, None)
    if first is None:
        return
    name = f"part-{TaskContext.get().partitionId():05d}.parquet"
    done = write_parquet(open_filesystem(root)[0], f"{folder}/{name}", schema,
                          itertools.chain([first], groups))
    yield pa.RecordBatch.from_pydict({"file": [name], "rows": [done.rows],
                                      "sha256": [done.sha256]})


def spark_arrow_schema(df) -> pa.Schema:
    """The Arrow schema of ``df`` as written (Spark's microsecond timestamps become ms)."""
    from pyspark.sql.pandas.types import to_arrow_schema

    tz = df.sparkSession.conf.get("spark.sql.session.timeZone")
    return pa.schema([f.with_type(pa.timestamp("ms", f.type.tz))
                      if pa.types.is_timestamp(f.type) else f
                      for f in to_arrow_schema(df.schema, timezone=tz)])
