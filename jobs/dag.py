"""The DAG of stages: planning from declared inputs and outputs, idempotent skipping, run state.

The DAG is an explicit list of :class:`~jobs.stage.Stage` declarations (``jobs/stages``). Its
order comes from the tables each stage reads and writes (``graphlib.TopologicalSorter``; among
stages ready at the same time, the list order decides), never from where a function sits in a
file. Running stage S for a date ``ds``:

* its inputs are the snapshots the producing stages committed for the same ``ds`` (and, for a
  stage reading files outside the store, a fingerprint of those files);
* if a previous run of S for ``ds`` succeeded with the same input snapshots and the same config
  hash, and its output snapshots still exist, S is skipped (``--force`` runs it anyway);
* otherwise S runs, inside an MLflow run nested under the DAG run, reading and writing only what
  it declares (``ctx.io`` refuses anything else), and its outputs are recorded.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import graphlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from tqdm.auto import tqdm

from feature_store.snapshots import Manifest, SnapshotStore
from jobs.config import QarmConfig
from jobs.stage import DagError, Stage, StageContext, StageIO, StageReport
from jobs.state import RunState
from jobs.tracking import Tracker

log = logging.getLogger(__name__)

#: Part of every skip key: bump when what stages write changes shape (typed manifest facts),
#: so that a new version re-runs stages instead of skipping onto snapshots it cannot read.
LAYOUT_VERSION = 3


@dataclass
class StageOutcome:
    stage: str
    status: str  # "done" | "skipped"
    outputs: dict[str, str]
    seconds: float
    report: str = ""


def plan_order(stages: Sequence[Stage], cfg: QarmConfig) -> list[Stage]:
    """The stages that apply to ``cfg``, each after every stage producing a table it reads.

    Raises :class:`DagError` when two stages write one table, a stage reads a table no stage
    produces, or the declarations form a cycle."""
    applicable = [s for s in stages if s.applies(cfg)]
    names = [s.name for s in applicable]
    if len(set(names)) != len(names):
        raise DagError(f"stage names repeat: {', '.join(names)}")
    producer: dict[str, Stage] = {}
    for s in applicable:
        for table in s.output_tables(cfg):
            if table in producer:
                raise DagError(f"stages '{producer[table].name}' and '{s.name}' both write "
                               f"'{table}'")
            producer[table] = s
    graph = {}
    for s in applicable:
        deps = set()
        for table in s.input_tables(cfg):
            if table not in producer:
                raise DagError(f"stage '{s.name}' reads '{table}', which no stage of this DAG "
                               f"produces")
            deps.add(producer[table].name)
        graph[s.name] = deps
    sorter = graphlib.TopologicalSorter(graph)
    try:
        sorter.prepare()
    except graphlib.CycleError as e:
        raise DagError(f"stage declarations form a cycle: {' -> '.join(e.args[1])}") from None
    position = {n: i for i, n in enumerate(names)}
    by_name = {s.name: s for s in applicable}
    order, ready = [], []
    while sorter.is_active():
        ready.extend(sorter.get_ready())
        ready.sort(key=position.__getitem__)
        name = ready.pop(0)
        order.append(by_name[name])
        sorter.done(name)
    return order


class Dag:
    def __init__(self, cfg: QarmConfig, stages: Sequence[Stage]):
        self.cfg = cfg
        self.all_stages = list(stages)
        self.root = cfg.root
        self.store = SnapshotStore(cfg.store_uri)
        self.state = RunState(self.root / "state.db")
        self.order = plan_order(self.all_stages, cfg)
        #: The report of the last :meth:`run` (None before one, or when it failed).
        self.last_report: Optional[Path] = None

    def stage(self, name: str) -> Stage:
        for s in self.order:
            if s.name == name:
                return s
        known = ", ".join(s.name for s in self.order)
        why = (" (not part of the DAG for this config)"
               if any(s.name == name for s in self.all_stages) else "")
        raise DagError(f"unknown stage '{name}'{why}; stages: {known}")

    def plan(self, until: Optional[str] = None, only: Optional[str] = None) -> list[Stage]:
        """All stages in order; the prefix ending at ``until``; or just ``only``."""
        for which, name in (("--until", until), ("--only", only)):
            if name is not None:
                try:
                    self.stage(name)
                except DagError as e:
                    raise DagError(f"{which} {e}") from None
        if only is not None:
            return [self.stage(only)]
        if until is not None:
            return self.order[: self.order.index(self.stage(until)) + 1]
        return list(self.order)

    def producer(self, table: str) -> Stage:
        for s in self.order:
            if table in s.output_tables(self.cfg):
                return s
        raise DagError(f"no stage of this DAG produces table '{table}'")

    def resolve_inputs(self, s: Stage, ds: str) -> dict[str, Manifest]:
        return self.resolve_tables(s.input_tables(self.cfg), ds, f"stage '{s.name}'", s.name)

    def resolve_tables(self, tables, ds: str, reader: str, until: str) -> dict[str, Manifest]:
        """The snapshots of ``tables`` that this run's (``ds``) producing stages wrote."""
        inputs = {}
        for table in tables:
            up = self.producer(table)
            rec = self.state.last_success(ds, up.name)
            if rec is None or table not in rec["outputs"]:
                raise DagError(f"{reader} needs '{table}' from stage '{up.name}', which "
                               f"has not run for ds={ds}; run `qarm run --ds {ds} --until "
                               f"{until}`")
            inputs[table] = self.store.resolve(rec["outputs"][table])
        return inputs

    def resolve_previous_day(self, s: Stage, ds: str) -> dict[str, Manifest]:
        """The previous day's snapshots a daily stage reads (``Stage.previous``): for each
        table, what its producing stage committed on the latest ``ds`` before this one; tables
        no earlier day produced are absent (the first day builds from scratch)."""
        out = {}
        for table in s.previous_tables(self.cfg):
            rec = self.state.last_success_before(ds, self.producer(table).name)
            if rec is not None and table in rec["outputs"] and self.store.exists(
                    rec["outputs"][table]):
                out[table] = self.store.resolve(rec["outputs"][table])
        return out

    def config_hash(self, s: Stage) -> str:
        sections = s.config_sections(self.cfg)
        return self.cfg.section_hash(*sections) if sections else ""

    def input_key(self, s: Stage, inputs: dict[str, Manifest],
                  previous: Optional[dict[str, Manifest]] = None) -> str:
        key = {
            "layout": LAYOUT_VERSION,
            "inputs": {t: m.ref for t, m in sorted(inputs.items())},
            "config": self.config_hash(s),
            "external": s.external_fingerprint(self.cfg),
        }
        if previous:      # only daily runs that continue a day: other keys stay as they were
            key["previous_day"] = {t: m.ref for t, m in sorted(previous.items())}
        blob = json.dumps(key, sort_keys=True)
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
                outcomes.append(self._run_stage(s, ds, force, tracker, progress))
            bar.close()
            self.last_report = self._report(ds, tracker)
        return outcomes

    def _report(self, ds: str, tracker: Tracker) -> Optional[Path]:
        """The run report (``jobs.run_report``). Every stage has committed by now: a failure
        here is logged, not raised, so it cannot undo a finished run."""
        from jobs.run_report import build

        try:
            path = build(self.cfg, self, ds, tracker)
        except Exception as e:  # noqa: BLE001 - see the docstring
            log.warning("the run report could not be written (%s: %s); `qarm report --ds %s` "
                        "retries", type(e).__name__, e, ds)
            return None
        log.info("run report: %s", path)
        return path

    def _skippable(self, s: Stage, ds: str, key: str) -> Optional[dict]:
        prev = self.state.last_success(ds, s.name)
        if (prev is not None and prev["input_key"] == key
                and set(s.output_tables(self.cfg)) <= set(prev["outputs"])
                and all(self.store.exists(ref) for ref in prev["outputs"].values())):
            return prev
        return None

    def _run_stage(self, s: Stage, ds: str, force: bool, tracker: Tracker,
                   progress: bool = True) -> StageOutcome:
        inputs = self.resolve_inputs(s, ds)
        previous = self.resolve_previous_day(s, ds)
        key = self.input_key(s, inputs, previous)
        prev = None if force else self._skippable(s, ds, key)
        if prev is not None:
            log.info("stage %s: inputs and config unchanged, outputs present: skipped", s.name)
            with tracker.run(s.name, nested=True, tags={"qarm.stage": s.name,
                                                        "qarm.skipped": "true"}):
                tracker.tags({f"output.{t}": ref for t, ref in prev["outputs"].items()})
            return StageOutcome(s.name, "skipped", prev["outputs"], 0.0,
                                prev["metrics"].get("_report", ""))
        started = time.time()
        outputs = s.output_tables(self.cfg)
        io = StageIO(self.store, s, inputs, outputs, self.config_hash(s), previous,
                     s.declared_previous(self.cfg))
        ctx = StageContext(self.cfg, ds, io, tracker, progress)
        refs = {t: m.ref for t, m in inputs.items()}
        with tracker.run(s.name, nested=True, tags={"qarm.stage": s.name}) as run_id:
            section = self.cfg.to_dict()
            tracker.params({sec: section[sec] for sec in s.config_sections(self.cfg)})
            tracker.tags({f"input.{t}": ref for t, ref in refs.items()})
            tracker.tags({f"previous_day.{t}": m.ref for t, m in previous.items()})
            log.info("stage %s: running (ds=%s)", s.name, ds)
            try:
                report = s.run(ctx)
                if not isinstance(report, StageReport):
                    raise DagError(f"stage {s.name} returned {type(report).__name__}, not a "
                                   "StageReport")
                missing = set(outputs) - set(report.outputs)
                if missing:
                    raise DagError(f"stage {s.name} did not produce "
                                   f"{', '.join(sorted(missing))}")
            except Exception as e:
                self.state.record(ds=ds, stage=s.name, status="failed", input_key=key,
                                  inputs=refs, outputs={}, metrics={}, mlflow_run_id=run_id,
                                  started=started, finished=time.time(),
                                  error=f"{type(e).__name__}: {e}"[:2000])
                raise
            seconds = time.time() - started
            out_refs = {t: m.ref for t, m in report.outputs.items()}
            metrics, text = report.metrics(), report.text()
            tracker.metrics({**metrics, "duration_s": seconds})
            tracker.tags({f"output.{t}": ref for t, ref in out_refs.items()})
            if text:
                tracker.artifact_text(text, f"{s.name}_report.txt")
            self.state.record(ds=ds, stage=s.name, status="done", input_key=key, inputs=refs,
                              outputs=out_refs, metrics={**metrics, "_report": text},
                              mlflow_run_id=run_id, started=started, finished=time.time(),
                              error=None)
        return StageOutcome(s.name, "done", out_refs, seconds, text)

    def status(self, ds: Optional[str] = None) -> list[dict]:
        """Latest state of every stage per ds (newest ds first, stages in DAG order)."""
        latest: dict[tuple[str, str], dict] = {}
        for r in self.state.rows(ds):
            latest[(r["ds"], r["stage"])] = r
        order = {s.name: i for i, s in enumerate(self.order)}
        return sorted(latest.values(), key=lambda r: (r["ds"], -order.get(r["stage"], 99)),
                      reverse=True)


def stage_graph(stages: Sequence[Stage], cfg: QarmConfig) -> list[dict]:
    """The DAG for schedulers, in run order: each stage, its engine and the stages that produce
    its inputs (its upstream edges). Touches no store or state (an Airflow DAG file calls it)."""
    order = plan_order(stages, cfg)
    producer = {t: s.name for s in order for t in s.output_tables(cfg)}
    return [{"stage": s.name, "engine": s.engine,
             "upstream": sorted({producer[t] for t in s.input_tables(cfg) if t in producer})}
            for s in order]


def today() -> str:
    return dt.datetime.now(dt.timezone.utc).date().isoformat()


def outcome_dict(o: StageOutcome) -> dict:
    return dataclasses.asdict(o)
