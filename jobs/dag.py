"""The DAG of stages: registration, input resolution, idempotent skipping, run state.

A stage declares the tables it reads and writes and the config sections it depends on. Running
stage S for a date ``ds``:

* its inputs are the snapshots the upstream stages produced for the same ``ds`` (and, for a
  stage reading files outside the store, a fingerprint of those files);
* if a previous run of S for ``ds`` succeeded with the same input snapshots and the same config
  hash, and its output snapshots still exist, S is skipped (``--force`` runs it anyway);
* otherwise S runs, inside an MLflow run nested under the DAG run, and its outputs are recorded.

Run state lives in SQLite (``<root>/state.db``), so ``qarm status`` can show it and concurrent
``qarm`` processes do not corrupt it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Optional

from tqdm.auto import tqdm

from feature_store.snapshots import Manifest, SnapshotStore
from jobs.config import QarmConfig
from jobs.tracking import Tracker

log = logging.getLogger(__name__)


class DagError(RuntimeError):
    """A stage cannot run: unknown name, or an upstream output is missing."""


@dataclass
class StageResult:
    outputs: dict[str, Manifest]
    metrics: dict = field(default_factory=dict)
    #: Lines printed for a person after the stage (tables, where things are).
    report: str = ""


@dataclass
class StageContext:
    cfg: QarmConfig
    store: SnapshotStore
    ds: str
    inputs: dict[str, Manifest]
    tracker: Tracker
    config_hash: str
    dag: Optional["Dag"] = None

    def upstream(self, table: str) -> Optional[Manifest]:
        """A table produced earlier for this ``ds`` that the stage does not declare as an input
        (evaluation reads, e.g. the synthetic ground truth); None when it was not produced."""
        if self.dag is None:
            return None
        try:
            return self.dag.resolve_inputs(
                dataclasses.replace(REGISTRY[self.dag.producer(table).name], inputs=(table,)),
                self.ds)[table]
        except DagError:
            return None

    @cached_property
    def spark(self):
        from pipelines.spark import get_spark

        return get_spark(self.cfg)

    @property
    def parents(self) -> list[str]:
        return [m.ref for m in self.inputs.values()]


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable[[StageContext], StageResult]
    #: Tables read, or a function of the config giving them (ingest reads files or raw tables).
    inputs: tuple[str, ...] | Callable[[QarmConfig], tuple[str, ...]]
    outputs: tuple[str, ...]
    config_sections: tuple[str, ...]
    help: str
    #: Whether the stage belongs to the DAG for this config (e.g. ``world`` only for synthetic).
    applies: Callable[[QarmConfig], bool] = lambda cfg: True
    #: Fingerprint of inputs that live outside the store (raw files), part of the skip key.
    external_fingerprint: Callable[[QarmConfig], str] = lambda cfg: ""

    def input_tables(self, cfg: QarmConfig) -> tuple[str, ...]:
        return self.inputs(cfg) if callable(self.inputs) else self.inputs


REGISTRY: dict[str, Stage] = {}


def stage(name: str, *, inputs=(), outputs=(), config=(), help="", applies=None,
          external_fingerprint=None):
    """Register a stage function (in DAG order: register upstream stages first)."""

    def deco(fn):
        REGISTRY[name] = Stage(name, fn, inputs if callable(inputs) else tuple(inputs),
                               tuple(outputs), tuple(config), help,
                               applies or (lambda cfg: True),
                               external_fingerprint or (lambda cfg: ""))
        return fn

    return deco


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


# ----------------------------------------------------------------------------- state


class RunState:
    """Stage runs per ``ds`` in SQLite."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        with self._conn() as c:
            c.execute("""CREATE TABLE IF NOT EXISTS stage_runs (
                ds TEXT, stage TEXT, status TEXT, input_key TEXT, inputs TEXT, outputs TEXT,
                metrics TEXT, mlflow_run_id TEXT, started REAL, finished REAL, error TEXT)""")

    def _conn(self):
        return sqlite3.connect(self.path, timeout=30)

    def record(self, **row) -> None:
        cols = ", ".join(row)
        with self._conn() as c:
            c.execute(f"INSERT INTO stage_runs ({cols}) VALUES ({', '.join('?' * len(row))})",
                      [json.dumps(v) if isinstance(v, (dict, list)) else v for v in row.values()])

    def last_success(self, ds: str, stage_name: str) -> Optional[dict]:
        with self._conn() as c:
            c.row_factory = sqlite3.Row
            r = c.execute("SELECT * FROM stage_runs WHERE ds=? AND stage=? AND status='done' "
                          "ORDER BY finished DESC LIMIT 1", (ds, stage_name)).fetchone()
        if r is None:
            return None
        d = dict(r)
        for k in ("inputs", "outputs", "metrics"):
            d[k] = json.loads(d[k]) if d[k] else {}
        return d

    def rows(self, ds: Optional[str] = None) -> list[dict]:
        with self._conn() as c:
            c.row_factory = sqlite3.Row
            q = "SELECT * FROM stage_runs" + (" WHERE ds=?" if ds else "") + " ORDER BY started"
            return [dict(r) for r in c.execute(q, (ds,) if ds else ())]


# ----------------------------------------------------------------------------- runner


@dataclass
class StageOutcome:
    stage: str
    status: str  # "done" | "skipped"
    outputs: dict[str, str]
    seconds: float
    report: str = ""


class Dag:
    def __init__(self, cfg: QarmConfig):
        import jobs.stages  # noqa: F401  (registers the stages)

        self.cfg = cfg
        self.root = cfg.root
        self.store = SnapshotStore(cfg.store_uri)
        self.state = RunState(self.root / "state.db")

    def stages(self) -> list[Stage]:
        return [s for s in REGISTRY.values() if s.applies(self.cfg)]

    def plan(self, until: Optional[str] = None, only: Optional[str] = None) -> list[Stage]:
        stages = self.stages()
        names = [s.name for s in stages]
        for which, name in (("--until", until), ("--only", only)):
            if name is not None and name not in names:
                known = ", ".join(names)
                why = "" if name not in REGISTRY else " (not part of the DAG for this config)"
                raise DagError(f"{which} {name}: unknown stage{why}; stages: {known}")
        if only is not None:
            return [REGISTRY[only]]
        if until is not None:
            return stages[: names.index(until) + 1]
        return stages

    def producer(self, table: str) -> Stage:
        for s in self.stages():
            if table in s.outputs:
                return s
        raise DagError(f"no stage of this DAG produces table '{table}'")

    def resolve_inputs(self, s: Stage, ds: str) -> dict[str, Manifest]:
        inputs = {}
        for table in s.input_tables(self.cfg):
            up = self.producer(table)
            rec = self.state.last_success(ds, up.name)
            if rec is None or table not in rec["outputs"]:
                raise DagError(f"stage '{s.name}' needs '{table}' from stage '{up.name}', which "
                               f"has not run for ds={ds}; run `qarm run --ds {ds} --until "
                               f"{s.name}`")
            inputs[table] = self.store.resolve(rec["outputs"][table])
        return inputs

    def input_key(self, s: Stage, inputs: dict[str, Manifest]) -> str:
        blob = json.dumps({
            "inputs": {t: m.ref for t, m in sorted(inputs.items())},
            "config": self.cfg.section_hash(*s.config_sections) if s.config_sections else "",
            "external": s.external_fingerprint(self.cfg),
        }, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def run(self, ds: str, *, until: Optional[str] = None, only: Optional[str] = None,
            force: bool = False, progress: bool = True) -> list[StageOutcome]:
        plan = self.plan(until, only)
        tracker = Tracker(self.cfg)
        outcomes = []
        with tracker.run(f"dag {ds}", tags={"qarm.ds": ds, "qarm.kind": "dag"}):
            tracker.params({"ds": ds, "stages": ",".join(s.name for s in plan), "force": force})
            bar = tqdm(plan, desc="qarm", unit="stage", disable=not progress)
            for s in bar:
                bar.set_postfix_str(s.name)
                outcomes.append(self._run_stage(s, ds, force, tracker))
            bar.close()
        return outcomes

    def _run_stage(self, s: Stage, ds: str, force: bool, tracker: Tracker) -> StageOutcome:
        inputs = self.resolve_inputs(s, ds)
        key = self.input_key(s, inputs)
        prev = self.state.last_success(ds, s.name)
        if (not force and prev is not None and prev["input_key"] == key
                and set(s.outputs) <= set(prev["outputs"])
                and all(self.store.exists(ref) for ref in prev["outputs"].values())):
            log.info("stage %s: inputs and config unchanged, outputs present: skipped", s.name)
            with tracker.run(s.name, nested=True, tags={"qarm.stage": s.name,
                                                        "qarm.skipped": "true"}):
                tracker.tags({f"output.{t}": ref for t, ref in prev["outputs"].items()})
            return StageOutcome(s.name, "skipped", prev["outputs"], 0.0,
                                prev["metrics"].get("_report", ""))
        started = time.time()
        ctx = StageContext(self.cfg, self.store, ds, inputs, tracker,
                           self.cfg.section_hash(*s.config_sections) if s.config_sections else "",
                           self)
        with tracker.run(s.name, nested=True, tags={"qarm.stage": s.name}) as run_id:
            section = self.cfg.to_dict()
            tracker.params({sec: section[sec] for sec in s.config_sections})
            tracker.tags({f"input.{t}": m.ref for t, m in inputs.items()})
            log.info("stage %s: running (ds=%s)", s.name, ds)
            try:
                result = s.fn(ctx)
            except Exception as e:
                self.state.record(ds=ds, stage=s.name, status="failed", input_key=key,
                                  inputs={t: m.ref for t, m in inputs.items()}, outputs={},
                                  metrics={}, mlflow_run_id=run_id, started=started,
                                  finished=time.time(), error=f"{type(e).__name__}: {e}"[:2000])
                raise
            seconds = time.time() - started
            missing = set(s.outputs) - set(result.outputs)
            if missing:
                raise DagError(f"stage {s.name} did not produce {', '.join(sorted(missing))}")
            outputs = {t: m.ref for t, m in result.outputs.items()}
            tracker.metrics({**result.metrics, "duration_s": seconds})
            tracker.tags({f"output.{t}": ref for t, ref in outputs.items()})
            if result.report:
                tracker.artifact_text(result.report, f"{s.name}_report.txt")
            self.state.record(ds=ds, stage=s.name, status="done", input_key=key,
                              inputs={t: m.ref for t, m in inputs.items()}, outputs=outputs,
                              metrics={**result.metrics, "_report": result.report},
                              mlflow_run_id=run_id, started=started,
                              finished=time.time(), error=None)
        return StageOutcome(s.name, "done", outputs, seconds, result.report)

    def status(self, ds: Optional[str] = None) -> list[dict]:
        """Latest state of every stage per ds (newest ds first)."""
        latest: dict[tuple[str, str], dict] = {}
        for r in self.state.rows(ds):
            for k in ("inputs", "outputs", "metrics"):
                r[k] = json.loads(r[k]) if r[k] else {}
            latest[(r["ds"], r["stage"])] = r
        order = {s.name: i for i, s in enumerate(REGISTRY.values())}
        return sorted(latest.values(), key=lambda r: (r["ds"], -order.get(r["stage"], 99)),
                      reverse=True)


def today() -> str:
    return dt.datetime.now(dt.timezone.utc).date().isoformat()


def outcome_dict(o: StageOutcome) -> dict:
    return dataclasses.asdict(o)
