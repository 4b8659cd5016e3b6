"""What a stage is: its declaration, the context it runs in, the store handle it reads and writes
through, and the typed report it returns.

A stage module (``jobs/stages/<name>.py``) declares one :class:`Stage`: the tables it reads and
writes and the config sections it depends on. Its ``run`` function reads the declared inputs
through ``ctx.io``, calls one package function, writes the declared outputs and returns a
:class:`StageReport`. ``ctx.io`` raises :class:`UndeclaredTable` on any read of a table the stage
did not declare, or a write of one it does not output: the DAG's skip key (input snapshots +
config) and every manifest's lineage are therefore exact.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, TypeVar

import pyarrow as pa

from feature_store.snapshots import Manifest, SnapshotNotFound, SnapshotStore

if TYPE_CHECKING:
    from jobs.config import QarmConfig
    from jobs.tracking import Tracker

F = TypeVar("F")


class DagError(RuntimeError):
    """A stage cannot run: unknown name, a missing upstream output, a bad declaration."""


class UndeclaredTable(DagError):
    """A stage read a table it does not declare as an input (or wrote one it does not output)."""


Tables = tuple[str, ...]


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[["StageContext"], "StageReport"]
    #: Tables read, or a function of the config giving them.
    inputs: Tables | Callable[["QarmConfig"], Tables]
    #: Tables written, or a function of the config giving them.
    outputs: Tables | Callable[["QarmConfig"], Tables]
    #: Config sections the stage depends on (part of its skip key), or a function of the config
    #: giving them.
    config: Tables | Callable[["QarmConfig"], Tables]
    help: str
    #: Whether the stage belongs to the DAG for this config (e.g. ``world`` only for synthetic).
    applies: Callable[["QarmConfig"], bool] = lambda cfg: True
    #: Fingerprint of inputs that live outside the store (raw files), part of the skip key.
    external_fingerprint: Callable[["QarmConfig"], str] = lambda cfg: ""
    #: Own outputs whose latest committed snapshot the stage continues (ingest keeps the dense
    #: ids it gave before). Read with ``ctx.io.previous``; recorded as parents of the new
    #: snapshots, not part of the skip key (it changes with every run of the stage itself).
    continues: Tables = ()
    #: Tables of the previous day's run the stage reads when ``daily.incremental`` is on (or a
    #: function of the config giving them): the snapshots their producing stages committed for
    #: the latest earlier ``ds``. Read with ``ctx.io.previous_day``; part of the skip key and
    #: of the lineage, so a day reruns when the day it continues changed.
    previous: Tables | Callable[["QarmConfig"], Tables] = ()
    #: What runs the stage's work, for schedulers: ``spark`` (submit it with spark-submit),
    #: ``torch`` (training ranks: torchrun) or ``python`` (the driver process alone).
    engine: str = "python"

    def input_tables(self, cfg: "QarmConfig") -> Tables:
        return tuple(self.inputs(cfg) if callable(self.inputs) else self.inputs)

    def output_tables(self, cfg: "QarmConfig") -> Tables:
        return tuple(self.outputs(cfg) if callable(self.outputs) else self.outputs)

    def declared_previous(self, cfg: "QarmConfig") -> Tables:
        return tuple(self.previous(cfg) if callable(self.previous) else self.previous)

    def previous_tables(self, cfg: "QarmConfig") -> Tables:
        """The previous day's tables the stage reads in this config (none unless daily)."""
        return self.declared_previous(cfg) if cfg.daily.incremental else ()

    def config_sections(self, cfg: "QarmConfig") -> Tables:
        return tuple(self.config(cfg) if callable(self.config) else self.config)


@dataclass
class StageReport:
    """What a stage returns: the snapshots it committed, plus what a person and MLflow see.

    Stages subclass it with typed fields and override :meth:`text` (printed after the run and
    kept with the run state) and :meth:`metrics` (logged to MLflow)."""

    outputs: dict[str, Manifest]

    def text(self) -> str:
        return ""

    def metrics(self) -> dict[str, float]:
        return {}


class StageIO:
    """A stage's view of the snapshot store: its declared inputs (the snapshots the DAG resolved
    for this run) and its declared outputs, nothing else."""

    def __init__(self, store: SnapshotStore, stage: Stage, inputs: dict[str, Manifest],
                 outputs: Tables, config_hash: str,
                 previous_day: Optional[dict[str, Manifest]] = None,
                 previous_tables: Tables = ()):
        self.store, self.stage, self.inputs = store, stage, inputs
        self.outputs, self.config_hash = outputs, config_hash
        self.previous_refs: list[str] = []
        #: The previous day's snapshots (daily runs): declared table -> manifest, absent when
        #: no earlier day produced it.
        self.previous_day_inputs = dict(previous_day or {})
        self.previous_declared = tuple(previous_tables)

    # ---------------------------------------------------------------- reading
    def manifest(self, table: str) -> Manifest:
        """The manifest of a declared input."""
        if table not in self.inputs:
            declared = ", ".join(self.inputs) or "none"
            raise UndeclaredTable(
                f"stage '{self.stage.name}' read '{table}', which it does not declare as an "
                f"input (declared: {declared}); add it to the stage's inputs so its skip key "
                f"and lineage include it")
        return self.inputs[table]

    def has(self, table: str) -> bool:
        """Whether ``table`` is a declared input of this run (inputs may depend on config)."""
        return table in self.inputs

    def facts(self, table: str, kind: type[F]) -> F:
        """The typed facts of a declared input."""
        return self.manifest(table).facts_of(kind)

    def arrow(self, table: str, columns: Optional[list[str]] = None) -> pa.Table:
        m = self.manifest(table)
        return self.store.read_arrow(table, m.snapshot_id, columns=columns)

    def spark(self, spark, table: str):
        m = self.manifest(table)
        return self.store.read_spark(spark, table, m.snapshot_id)

    def files(self, table: str) -> list[str]:
        """Paths of a declared input's Parquet files (for readers outside Spark and Arrow)."""
        m = self.manifest(table)
        return [f"{m.path}/{f}" for f in m.files]

    def previous_spark(self, spark, table: str):
        """The latest committed snapshot of one of the stage's own outputs that it continues
        (``Stage.continues``) as a DataFrame, or None when there is none yet."""
        if table not in self.stage.continues:
            raise UndeclaredTable(f"stage '{self.stage.name}' read the previous '{table}', which "
                                  f"it does not declare in Stage.continues")
        try:
            m = self.store.get(table)
        except SnapshotNotFound:
            return None
        self.previous_refs.append(m.ref)
        return self.store.read_spark(spark, table, m.snapshot_id)

    def previous_day(self, table: str) -> Optional[Manifest]:
        """The previous day's snapshot of ``table`` (declared in ``Stage.previous``), or None on
        the first day and whenever ``daily.incremental`` is off."""
        if table not in self.previous_declared:
            raise UndeclaredTable(f"stage '{self.stage.name}' read the previous day's '{table}', "
                                  "which it does not declare in Stage.previous")
        return self.previous_day_inputs.get(table)

    def previous_day_arrow(self, table: str, columns: Optional[list[str]] = None) -> pa.Table:
        m = self._previous_or_fail(table)
        return self.store.read_arrow(table, m.snapshot_id, columns=columns)

    def previous_day_spark(self, spark, table: str):
        m = self._previous_or_fail(table)
        return self.store.read_spark(spark, table, m.snapshot_id)

    def _previous_or_fail(self, table: str) -> Manifest:
        m = self.previous_day(table)
        if m is None:
            raise DagError(f"stage '{self.stage.name}' read the previous day's '{table}', but no "
                           "earlier day produced it (check previous_day() first)")
        return m

    def _check_written(self, m: Manifest) -> None:
        if m.table not in self.outputs:
            raise UndeclaredTable(f"stage '{self.stage.name}' read back '{m.table}', which it "
                                  "does not output")

    def written_spark(self, spark, m: Manifest):
        """A snapshot this stage has just committed, read back as a DataFrame."""
        self._check_written(m)
        return self.store.read_spark(spark, m.table, m.snapshot_id)

    def written_arrow(self, m: Manifest) -> pa.Table:
        """A snapshot this stage has just committed, read back as an Arrow table."""
        self._check_written(m)
        return self.store.read_arrow(m.table, m.snapshot_id)

    # ---------------------------------------------------------------- writing
    @property
    def parents(self) -> list[str]:
        return ([m.ref for m in self.inputs.values()] + self.previous_refs
                + [m.ref for m in self.previous_day_inputs.values()])

    def _check_output(self, table: str) -> None:
        if table not in self.outputs:
            raise UndeclaredTable(f"stage '{self.stage.name}' wrote '{table}', which it does not "
                                  f"declare as an output (declared: {', '.join(self.outputs)})")

    def write_arrow(self, table: str, data: pa.Table, *, schema: Optional[pa.Schema] = None,
                    facts=None) -> Manifest:
        self._check_output(table)
        return self.store.write_table(table, data, schema=schema, parents=self.parents,
                                      config_hash=self.config_hash, facts=facts)

    def write_spark(self, table: str, df, schema: pa.Schema, *, facts=None) -> Manifest:
        self._check_output(table)
        return self.store.write_spark(table, df, schema, parents=self.parents,
                                      config_hash=self.config_hash, facts=facts)

    def writer(self, table: str, *, schema: Optional[pa.Schema] = None, facts=None):
        """A :class:`SnapshotWriter` for one declared output (Arrow batches written one by one)."""
        self._check_output(table)
        return self.store.writer(table, schema=schema, parents=self.parents,
                                 config_hash=self.config_hash, facts=facts)


@dataclass
class StageContext:
    cfg: "QarmConfig"
    ds: str
    io: StageIO
    tracker: "Tracker"
    #: Progress bars on the console (``qarm ... --no-progress``: none, and the ranks' output
    #: goes to their log files).
    progress: bool = True

    @cached_property
    def spark(self):
        from pipelines.spark import get_spark

        return get_spark(self.cfg.spark, self.cfg.root / "spark", self.cfg.root / "logs")

    @property
    def artifacts(self) -> Path:
        """Where stages keep versioned artifacts (encoders, codebooks) on the local disk."""
        return self.cfg.root / "artifacts"

    def run_dir(self, *parts: str) -> Path:
        """A working folder of this run of the stage: ``<root>/runs/<ds>/<parts...>``."""
        return self.cfg.root.joinpath("runs", self.ds, *parts)


def files_fingerprint(paths: list[Optional[str]]) -> str:
    """Name, size and mtime of each file (folders: of every file below): cheap change detection."""
    h = hashlib.sha256()
    for p in paths:
        if not p:
            continue
        path = Path(p)
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for f in files:
            if f.is_file():
                st = f.stat()
                h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
