"""``qarm ablation``: the project's central question, measured with seeds and intervals.

1. Runs the DAG up to ``examples`` (skipping what is current), so every arm reads the same split,
   codes and examples.
2. **Grid** (seed 0 only): every arm trains once per combination of ``ablation.grid`` (the same
   grid for every arm), early-stopped on the validation part; the combination with the best
   validation metric is the arm's choice. The grid never reads the test part: it is scored only
   after the choice, by the chosen run.
3. **Seeds**: each arm trains again with seeds 1 .. ``ablation.seeds - 1`` at its chosen settings
   (a seed changes initialisation and data order, not the split); the MF baseline runs once per
   seed, popularity once.
4. **Evaluation** (``recsys.evaluation.evaluate``): seed-averaged test metrics with bootstrap
   intervals over users, paired differences, calibration; printed, logged to MLflow and written
   to ``<root>/ablation/<ds>-<time>/ablation.json`` with the grid and the chosen settings. The
   chosen settings are also printed as ``train.tuned`` YAML to paste into a config.

The runs of the grid, and then the runs of the later seeds, are independent: they train
``train.parallel_arms`` at once (0: as many as the cores hold), each with its own ranks, and
their results do not depend on how many ran together.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def grid_combos(grid: dict[str, list[float]]) -> list[dict[str, float]]:
    from recsys.config import TUNABLE

    bad = set(grid) - set(TUNABLE)
    if bad:
        from jobs.config import ConfigError

        raise ConfigError(f"ablation.grid: unknown settings {sorted(bad)}; tunable: "
                          f"{', '.join(TUNABLE)}")
    keys = sorted(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def with_settings(train_cfg, settings: dict, seed: int):
    """``train_cfg`` (without its tuned overrides) at ``settings`` and ``seed``."""
    return dataclasses.replace(train_cfg, tuned={}, seed=seed, register=False).with_settings(
        settings, "ablation.grid")


def choose(runs: list[dict], metric: str) -> dict:
    """The grid run with the best validation metric (first on ties)."""
    import math

    scored = [r for r in runs if r["best_valid"] is not None and not math.isnan(r["best_valid"])]
    if not scored:
        raise ValueError("no grid run has a validation metric: the grid needs validation "
                         "examples with both labels")
    sign = 1.0 if metric == "auc" else -1.0
    return max(scored, key=lambda r: sign * r["best_valid"])


def grid_run(data, arm: str, i: int, combo: dict, *, train_cfg, out: Path) -> dict:
    """One grid run: ``arm`` at ``combo`` (the grid's ``i``-th) on seed 0."""
    from jobs.stages.train import train_one

    res = train_one(data, arm, with_settings(train_cfg, combo, 0),
                    out / "grid" / arm.replace("+", "_") / f"g{i}", quiet=True)
    log.info("grid %s %s: valid %s = %.4f at step %d", arm, combo, train_cfg.valid_metric,
             res.result["best_valid"] or float("nan"), res.result["best_step"])
    return {"arm": arm, "settings": combo, "best_valid": res.result["best_valid"],
            "best_step": res.result["best_step"], "steps": res.result["steps"], "result": res}


def run_grids(data, arms: list[str], train_cfg, combos, out: Path, workers: int = 1,
              progress=None) -> dict[str, tuple[dict, list]]:
    """Train every arm at every combination on seed 0, ``workers`` runs at once (``progress``
    is called after each run); returns {arm: (chosen run, its runs)}."""
    from recsys.launch import run_concurrently

    runs = run_concurrently(lambda item: grid_run(data, *item, train_cfg=train_cfg, out=out),
                            [(arm, i, c) for arm in arms for i, c in enumerate(combos)],
                            workers, done=progress)
    grids = {}
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        grids[arm] = (choose(mine, train_cfg.valid_metric), mine)
    return grids


def run_ablation(cfg, ds: str, *, grid: bool = True, progress: bool = True) -> dict:
    import pandas as pd
    from tqdm.auto import tqdm

    from jobs.stage import StageIO
    from jobs.stages import build_dag
    from jobs.stages.evaluate import load_truth
    from jobs.stages.train import (arm_workers, predictions_table, run_baselines, train_one,
                                   training_data, with_seed)
    from jobs.stages.world import is_synthetic
    from jobs.tracking import Tracker
    from recsys.evaluation import evaluate, flat_metrics, format_table
    from recsys.launch import run_concurrently

    t0 = time.time()
    a, t = cfg.ablation, cfg.train
    if a.seeds < 1:
        from jobs.config import ConfigError

        raise ConfigError("ablation.seeds must be at least 1")
    dag = build_dag(cfg)
    dag.run(ds, until="examples", progress=progress)
    train_stage = dag.stage("train")
    io = StageIO(dag.store, train_stage, dag.resolve_inputs(train_stage, ds), (), "")
    out = cfg.root / "ablation" / f"{ds}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    out.mkdir(parents=True, exist_ok=True)
    data = training_data(io, cfg, out)
    combos = grid_combos(a.grid) if grid else []
    workers = arm_workers(t)
    n_runs = len(t.arms) * ((len(combos) or 1) + a.seeds - 1)
    bar = tqdm(total=n_runs, desc=f"ablation ({workers} at once)", unit="run",
               disable=not progress)

    # Every arm's first run (its grid, or seed 0 at its settings), then every later seed: the
    # runs of a phase are independent, so they train ``workers`` at once.
    grid_rows, chosen, first = [], {}, {}

    def tick():
        bar.update(1)

    def seed_run(item):
        arm, seed = item
        return train_one(data, arm, with_settings(t, chosen[arm], seed),
                         out / "seeds" / arm.replace("+", "_") / f"s{seed}", quiet=True)
    if combos:
        grids = run_grids(data, t.arms, t, combos, out, workers, tick)
        for arm, (best, mine) in grids.items():
            chosen[arm], first[arm] = best["settings"], best["result"]
            grid_rows += [{k: v for k, v in r.items() if k != "result"} for r in mine]
    else:
        chosen = {arm: t.settings(arm) for arm in t.arms}
        first = dict(zip(t.arms, run_concurrently(seed_run, [(arm, 0) for arm in t.arms],
                                                  workers, done=tick)))
    later = [(arm, seed) for arm in t.arms for seed in range(1, a.seeds)]
    seeded = dict(zip(later, run_concurrently(seed_run, later, workers, done=tick)))
    bar.close()
    preds, arm_rows = [], []
    for arm in t.arms:
        for seed in range(a.seeds):
            res = seeded[(arm, seed)] if seed else first[arm]
            preds.append(with_seed(res.predictions, seed))
            arm_rows.append({"arm": arm, "seed": seed, "steps": res.result["steps"],
                             "best_step": res.result["best_step"],
                             "best_valid": res.result["best_valid"]})
    baseline_info = {}
    for seed in range(a.seeds):
        base, info = run_baselines(data, cfg, seed)
        for tbl, name in zip(base, t.baselines):
            if name == "popularity" and seed:
                continue          # deterministic: one run is all seeds
            preds.append(tbl)
            baseline_info[f"{name}/{seed}"] = info[name]
    truth = None
    if is_synthetic(cfg):
        tio = StageIO(dag.store, train_stage, dag.resolve_tables(
            ("truth_events", "item_id_map", "user_id_map"), ds, "ablation", "examples"), (), "")
        truth = load_truth(tio)
    frame = predictions_table(preds).to_pandas()
    result = evaluate(frame, truth, data.train_rate, a.bootstrap, a.level, settings=chosen)
    result.update({"grid": grid_rows, "chosen": chosen, "runs": arm_rows,
                   "baselines": baseline_info, "examples": data.examples_ref,
                   "wall_seconds": time.time() - t0, "ds": ds})
    table = format_table(result)
    (out / "ablation.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "ablation.txt").write_text(table + "\n")
    pd.DataFrame(frame).to_parquet(out / "predictions.parquet", index=False)
    tracker = Tracker(cfg)
    with tracker.run(f"ablation {ds}", tags={"qarm.ds": ds, "qarm.kind": "ablation"}):
        tracker.params({"arms": ",".join(t.arms), "seeds": a.seeds, "grid": json.dumps(a.grid),
                        "bootstrap": a.bootstrap})
        tracker.metrics(flat_metrics(result))
        tracker.artifact_text(table, "ablation.txt")
        tracker.artifact_text(json.dumps(result, indent=1, default=float), "ablation.json")
    result["out_dir"] = str(out)
    result["table"] = table
    return result


def tuned_yaml(chosen: dict[str, dict]) -> str:
    lines = ["train:", "  tuned:"]
    for arm, s in chosen.items():
        inner = ", ".join(f"{k}: {v:g}" for k, v in s.items())
        lines.append(f"    {json.dumps(arm)}: {{{inner}}}")
    return "\n".join(lines)
