"""The daily job on the synthetic world, measured (``make daily-check``), JSON on stdout.

Every run is the real ``qarm`` command in its own process, on ``configs/daily.yaml`` (the world
as it stands each evening, the last day as test, the day before as validation, the production
arm ``codes``), each scenario in its own root under ``--out``:

* **daily**: ``qarm backfill`` over three days. Per day: items embedded and kept (by content
  hash), the daily plan (refit or not, the drift measures), the codebook and encoder versions,
  which models warm-started, the wall time. Then the third day's ranker is trained again from
  scratch on the same examples (``--only train --set daily.warm_start=false``), and the two
  are compared on the third day's test part: AUC difference with a paired bootstrap interval
  over users.
* **rebuild**: the third day built from nothing (``daily.incremental=false``), the same data:
  its wall time is the denominator of the incremental day's ratio.
* **drift**: the same world with ``world.drift_ds`` on the second day (its new items come from
  new topics whose objects are shapes no earlier item has): that day must refit the alignment
  and the codebook and retrain from scratch.
* **rerun**: the third day run again: every stage skipped, nothing changes (idempotent).

    .venv/bin/python checks/daily_synthetic.py [--out .qarm-daily-check] [--first 2026-01-27]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def qarm(*args: str, root: Path, sets: list[str] = ()) -> float:
    """Run ``qarm`` with the daily config in ``root``; returns its wall time in seconds."""
    cmd = [str(ROOT / ".venv" / "bin" / "qarm"), *args, "--config",
           str(ROOT / "configs" / "daily.yaml"), "--set", f"paths.root={root}", "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    log = root.parent / f"{root.name}.log"
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}); see {log}")
    return time.perf_counter() - t0


def day_summary(root: Path, ds: str) -> dict:
    """What the run state and the manifests say about one day of one root."""
    from feature_store.facts import (CandidatesFacts, CodesFacts, DailyPlanFacts,
                                     PredictionsFacts)
    from feature_store.snapshots import SnapshotStore
    from jobs.state import RunState

    state, store = RunState(root / "state.db"), SnapshotStore(str(root / "store"))
    rec = {s: state.last_success(ds, s) for s in ("embed", "drift", "align", "quantize",
                                                  "train", "retrieve", "publish")}
    out = {"ds": ds,
           "embedded": rec["embed"]["metrics"].get("embedded"),
           "kept": rec["embed"]["metrics"].get("kept"),
           "items": rec["embed"]["metrics"].get("items_in")}
    if rec["drift"]:
        plan = store.resolve(rec["drift"]["outputs"]["daily_plan"]).facts_of(DailyPlanFacts)
        out.update(refit=plan.refit, reason=plan.reason, new_items=plan.new_items,
                   error_ratio=plan.error_ratio, error_ratio_chance=plan.error_ratio_null,
                   level1_shift=plan.tv, level1_shift_chance=plan.tv_null)
    codes = store.resolve(rec["quantize"]["outputs"]["item_codes"]).facts_of(CodesFacts)
    out.update(codebook=codes.codebook_version, codebook_fitted=codes.fitted,
               encoder=codes.encoder_version)
    preds = store.resolve(rec["train"]["outputs"]["ranker_predictions"])
    out["ranker_warm_started"] = list(preds.facts_of(PredictionsFacts).warm_started)
    if rec["retrieve"]:
        cand = store.resolve(rec["retrieve"]["outputs"]["candidates"])
        out["retriever_warm_started"] = list(cand.facts_of(CandidatesFacts).warm_started)
    out["stage_seconds"] = {r["stage"]: round(r["finished"] - r["started"], 1)
                            for r in state.rows(ds) if r["status"] == "done"}
    return out


def test_predictions(root: Path, ref: str):
    from feature_store.snapshots import SnapshotStore

    p = SnapshotStore(str(root / "store")).read_arrow(*ref.split("@")).to_pandas()
    p = p[(p.part == "test") & (p.arm == "codes")]
    return p.sort_values(["user_id", "item_id", "ts"]).reset_index(drop=True)


def compare_training(root: Path, day: str) -> dict:
    """The day's warm-started ranker (on the new day: the default) vs a retrain from scratch
    and a warm start on every training example, on the day's test part (paired over users)."""
    from jobs.state import RunState
    from recsys.metrics import auc
    from recsys.recode import paired_difference

    state = RunState(root / "state.db")
    refs = {"warm": state.last_success(day, "train")["outputs"]["ranker_predictions"]}
    began = time.time()
    for name, override in (("scratch", "daily.warm_start=false"),
                           ("warm_every_example", "daily.warm_days=null")):
        qarm("run", "--ds", day, "--only", "train", root=root, sets=[override])
        refs[name] = state.last_success(day, "train")["outputs"]["ranker_predictions"]
    preds = {k: test_predictions(root, ref) for k, ref in refs.items()}
    scratch = preds["scratch"]
    out = {"test_auc": {k: auc(p.label, p.score) for k, p in preds.items()}}
    for k in ("warm", "warm_every_example"):
        p = preds[k]
        assert (p[["user_id", "item_id", "ts"]].values
                == scratch[["user_id", "item_id", "ts"]].values).all()
        out[f"{k} - scratch"] = paired_difference(p.user_id.to_numpy(), p.label.to_numpy(),
                                                  p.score.to_numpy(), scratch.score.to_numpy())
    out["train_stage_s (scratch, every example)"] = [
        round(r["finished"] - r["started"], 1) for r in state.rows(day)
        if r["stage"] == "train" and r["status"] == "done" and r["started"] >= began]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".qarm-daily-check")
    ap.add_argument("--first", default="2026-01-27", help="the first of the three days")
    args = ap.parse_args()
    from jobs.daily import days
    from jobs.state import RunState

    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    d1 = dt.date.fromisoformat(args.first)
    d = days(d1.isoformat(), (d1 + dt.timedelta(2)).isoformat())
    res: dict = {"days": d}

    daily = out / "daily"
    walls = [qarm("run", "--ds", day, root=daily) for day in d]
    res["daily"] = [dict(day_summary(daily, day), wall_s=round(w, 1))
                    for day, w in zip(d, walls)]

    # Rerunning a day changes nothing: every stage is skipped.
    state = RunState(daily / "state.db")
    began = time.time()
    rerun_s = qarm("run", "--ds", d[2], root=daily)
    res["rerun"] = {"wall_s": round(rerun_s, 1),
                    "stages_run_again": sorted({r["stage"] for r in state.rows(d[2])
                                                if r["started"] >= began})}

    # The third (then the second) day's ranker from scratch on the same examples, and
    # warm-started on every training example, beside the default warm start (the new day).
    res["warm_vs_scratch"] = {day: compare_training(daily, day) for day in (d[2], d[1])}

    rebuild = out / "rebuild"
    rebuild_s = qarm("run", "--ds", d[2], root=rebuild, sets=["daily.incremental=false"])
    res["rebuild"] = {"ds": d[2], "wall_s": round(rebuild_s, 1),
                      "embedded": RunState(rebuild / "state.db").last_success(
                          d[2], "embed")["metrics"].get("embedded")}
    res["incremental_over_rebuild"] = round(res["daily"][2]["wall_s"] / rebuild_s, 3)

    drift = out / "drift"
    sets = [f"world.drift_ds={d[1]}"]
    for day in d[:2]:
        qarm("run", "--ds", day, root=drift, sets=sets)
    res["drift"] = [day_summary(drift, day) for day in d[:2]]
    print(json.dumps(res, indent=1, default=float))
    (out / "daily_check.json").write_text(json.dumps(res, indent=1, default=float))


if __name__ == "__main__":
    main()
