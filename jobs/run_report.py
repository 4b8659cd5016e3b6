"""The run report: what a person looks at after each DAG run.

:func:`collect` gathers the figures of one ``ds`` into a plain dict (``summary.json``): stage
timings and row counts (in, out, quarantined) from the run state and the snapshot manifests, the
ablation table with its intervals and paired differences (``evaluate``'s ``ablation.json``),
training and validation curves per arm (each arm's ``result.json``), codebook utilization and
collisions per level (``quantize``'s metrics), retrieval recall@K when a retrieval stage ran, and
the model versions this run registered (MLflow). :func:`jobs.report_html.render` turns that dict,
and nothing else, into one self-contained HTML file, so ``qarm report --run ID`` rebuilds the page
from ``summary.json`` alone. Both files live in ``<root>/reports/<run>/`` and are logged to the
DAG's MLflow run.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from pathlib import Path
from typing import Optional

from jobs.config import QarmConfig

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
REPORT = "report.html"
#: Points kept per curve in the summary (longer curves are averaged in buckets).
CURVE_POINTS = 400


class ReportError(LookupError):
    """The run or the figures a report needs do not exist."""


def reports_root(cfg: QarmConfig) -> Path:
    return cfg.root / "reports"


def new_run_id(ds: str) -> str:
    return f"{ds}T{dt.datetime.now(dt.timezone.utc).strftime('%H%M%S%f')[:-3]}"


def _finite(v):
    """JSON has no NaN: missing figures are null."""
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


def _clean(obj):
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()                                   # numpy scalars
    return _finite(obj)


def _downsample(curve: list[float], points: int = CURVE_POINTS) -> list[list[float]]:
    """``[[step, value], ...]`` with at most ``points`` points (bucket means)."""
    n = len(curve)
    if n <= points:
        return [[i + 1, float(v)] for i, v in enumerate(curve)]
    out = []
    for b in range(points):
        lo, hi = b * n // points, (b + 1) * n // points
        out.append([hi, sum(curve[lo:hi]) / (hi - lo)])
    return out


# ---------------------------------------------------------------------------- collection
def stage_rows(dag, ds: str) -> list[dict]:
    """Each stage's latest run for ``ds`` in DAG order: status, seconds, and the rows of every
    input, output and quarantine table (from the snapshot manifests)."""
    rows = []
    latest = {r["stage"]: r for r in dag.state.rows(ds)}
    for s in dag.order:
        r = latest.get(s.name)
        if r is None:
            continue

        def counts(refs: dict) -> dict:
            out = {}
            for table, ref in sorted(refs.items()):
                try:
                    out[table] = dag.store.resolve(ref).row_count
                except LookupError:
                    out[table] = None                      # collected since
            return out

        outs = counts(r["outputs"])
        rows.append({
            "stage": s.name, "status": r["status"], "error": r["error"],
            "seconds": (r["finished"] - r["started"]) if r["finished"] else None,
            "started": dt.datetime.fromtimestamp(r["started"], dt.timezone.utc).isoformat(),
            "inputs": counts(r["inputs"]),
            "outputs": {t: n for t, n in outs.items() if "quarantine" not in t},
            "quarantined": {t: n for t, n in outs.items() if "quarantine" in t}})
    return rows


def ablation_figures(cfg: QarmConfig, ds: str) -> Optional[dict]:
    """The evaluate stage's result for ``ds``: rows per arm and slice, paired differences."""
    path = cfg.root.joinpath("runs", ds, "evaluate", "ablation.json")
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    keep = ("auc", "gauc", "logloss", "ne", "cal_ne", "ne_train")
    rows = []
    for r in result["test"]:
        row = {"arm": r["arm"], "slice": r["slice"], "n": r["n"], "seeds": r.get("seeds")}
        for k in keep:
            row[k] = r.get(k)
            if f"{k}_ci" in r:
                row[f"{k}_lo"], row[f"{k}_hi"] = r[f"{k}_ci"]
        rows.append(row)
    pairs = [{"a": p["a"], "b": p["b"], "slice": p["slice"], "metric": p["metric"],
              "diff": p["diff"], "lo": p["ci"][0], "hi": p["ci"][1]} for p in result["pairs"]]
    return {"arms": result["arms"], "level": result["level"],
            "bootstrap": result["bootstrap"], "test": rows, "pairs": pairs,
            "valid": [{k: r.get(k) for k in ("arm", "slice", "n", "auc", "logloss")}
                      for r in result["valid"]]}


def training_curves(cfg: QarmConfig, ds: str) -> dict:
    """Per arm: the training loss curve (mean over ranks) and the validation curve."""
    out = {}
    for path in sorted(cfg.root.joinpath("runs", ds, "train").glob("*/result.json")):
        r = json.loads(path.read_text())
        out[r["arm"]] = {"loss": _downsample(r["loss_curve"]), "valid": r.get("valid_curve", []),
                         "valid_metric": r.get("valid_metric"), "steps": r["steps"],
                         "best_step": r.get("best_step"), "world": r.get("world")}
    return out


def codebook_figures(stages: list[dict], state_rows: dict) -> list[dict]:
    """Utilization and perplexity per level, collision rate per prefix, of each codes table."""
    out = []
    for s in stages:
        if not s["stage"].startswith("quantize"):
            continue
        m = state_rows[s["stage"]]["metrics"]
        levels = sorted({int(k[5:].split(".")[0]) for k in m if k.startswith("level")})
        prefixes = sorted({int(k[6:].split(".")[0]) for k in m if k.startswith("prefix")})
        out.append({
            "stage": s["stage"], "table": ", ".join(s["outputs"]),
            "levels": [{"level": lv, "utilization": m.get(f"level{lv}.utilization"),
                        "perplexity": m.get(f"level{lv}.perplexity")} for lv in levels],
            "prefixes": [{"prefix": p, "collision_rate": m.get(f"prefix{p}.collision_rate"),
                          "items_per_code_max": m.get(f"prefix{p}.items_per_code_max")}
                         for p in prefixes]})
    return out


def retrieval_figures(state_rows: dict) -> Optional[dict]:
    """Recall@K per retriever, when a ``retrieve`` stage ran (metrics ``<name>.recall_at_<K>``)."""
    r = state_rows.get("retrieve")
    if r is None:
        return None
    curves: dict[str, list] = {}
    for k, v in r["metrics"].items():
        name, _, at = k.rpartition(".recall_at_")
        if name and at.isdigit():
            curves.setdefault(name, []).append([int(at), v])
    return {n: sorted(c) for n, c in sorted(curves.items())} or None


def registered_versions(cfg: QarmConfig, state_rows: dict) -> list[dict]:
    """The model versions registered by this run's stages (MLflow registry)."""
    if not cfg.mlflow.enabled:
        return []
    import mlflow
    from jobs.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri(cfg))
    out = []
    for stage, r in state_rows.items():
        if not r.get("mlflow_run_id") or r["status"] != "done":
            continue
        for v in client.search_model_versions(f"run_id = '{r['mlflow_run_id']}'"):
            current = client.get_model_version(v.name, v.version)    # aliases as of now
            out.append({"stage": stage, "model": v.name, "version": str(v.version),
                        "aliases": sorted(getattr(current, "aliases", []) or []),
                        "tags": dict(v.tags)})
    return sorted(out, key=lambda v: (v["model"], int(v["version"])))


def collect(cfg: QarmConfig, dag, ds: str, run_id: Optional[str] = None) -> dict:
    state_rows = {r["stage"]: r for r in dag.state.rows(ds)}
    if not state_rows:
        raise ReportError(f"no stage has run for ds={ds}; run `qarm run --ds {ds}` first")
    stages = stage_rows(dag, ds)
    return _clean({
        "run": run_id or new_run_id(ds), "ds": ds,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": cfg.source.kind, "root": str(cfg.root),
        "stages": stages,
        "ablation": ablation_figures(cfg, ds),
        "training": training_curves(cfg, ds),
        "codebooks": codebook_figures(stages, state_rows),
        "retrieval": retrieval_figures(state_rows),
        "registered": registered_versions(cfg, state_rows),
    })


# ---------------------------------------------------------------------------- files
def write(cfg: QarmConfig, summary: dict, tracker=None) -> Path:
    """``summary.json`` and ``report.html`` under ``<root>/reports/<run>/``; logged to MLflow
    when a tracker is given. Returns the report's path."""
    from jobs.report_html import render

    folder = reports_root(cfg) / summary["run"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SUMMARY).write_text(json.dumps(summary, indent=1, allow_nan=False))
    (folder / REPORT).write_text(render(summary), encoding="utf-8")
    if tracker is not None:
        tracker.artifact_dir(str(folder), "report")
    return folder / REPORT


def build(cfg: QarmConfig, dag, ds: str, tracker=None) -> Path:
    return write(cfg, collect(cfg, dag, ds), tracker)


def rebuild(cfg: QarmConfig, run_id: Optional[str] = None) -> Path:
    """Re-render a report from its ``summary.json`` (the newest run's without ``run_id``)."""
    root = reports_root(cfg)
    if run_id is None:
        runs = sorted((p for p in root.glob(f"*/{SUMMARY}")), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise ReportError(f"no report under {root}: run `qarm run` first")
        run_id = runs[-1].parent.name
    path = root / run_id / SUMMARY
    if not path.exists():
        known = sorted(p.parent.name for p in root.glob(f"*/{SUMMARY}"))
        raise ReportError(f"no report {run_id!r} under {root} (known: "
                          f"{', '.join(known[-5:]) or 'none'})")
    return write(cfg, json.loads(path.read_text()))
