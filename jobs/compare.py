"""``qarm compare A B``: paired differences between two ablations of the same split.

An ablation (``qarm ablation``) answers "which arm wins under one configuration". Changing a
component upstream of the ranker (the image tower, the video tower, the fusion) asks another
question: *for each arm*, does the change help? Both ablations score the same test examples
(the split, and so the test part, does not depend on the content model), so the comparison is
paired: every bootstrap resample draws the same users for both sides, per arm and slice, with
each side's metric averaged over its seeds first, exactly as the ablation's own paired
differences (``recsys.ablation.ablation_stats``).

The two folders are ``<root>/ablation/<ds>-<time>/`` outputs (``ablation.json`` and
``predictions.parquet``). Arms (and baselines) present in both are compared; the result is
printed, written to ``<A>/compare-<B name>.json`` (and ``.txt``) and logged to MLflow.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

KEYS = ["user_id", "item_id", "ts", "label", "sampled"]


class CompareError(ValueError):
    """The two folders cannot be compared (missing files, different test examples)."""


def _load(folder: str | Path):
    import pandas as pd

    d = Path(folder)
    for name in ("ablation.json", "predictions.parquet"):
        if not (d / name).is_file():
            raise CompareError(f"{d} has no {name}: pass a folder that `qarm ablation` wrote "
                               "(<root>/ablation/<ds>-<time>/)")
    preds = pd.read_parquet(d / "predictions.parquet")
    return json.loads((d / "ablation.json").read_text()), preds[preds.part == "test"]


def compare_ablations(a_dir: str | Path, b_dir: str | Path, *, label_a: str = "",
                      label_b: str = "", bootstrap: int = 1000, level: float = 0.95,
                      seed: int = 0) -> dict:
    """Per arm common to both ablations: A's and B's seed-averaged test metrics and the paired
    difference A − B with its interval, per slice (all, cold, known and new users)."""
    import pandas as pd

    from recsys.ablation import ablation_stats
    from recsys.evaluation import SLICES

    label_a = label_a or Path(a_dir).name
    label_b = label_b or Path(b_dir).name
    if label_a == label_b:
        raise CompareError("the two sides need different labels (--label-a/--label-b)")
    ja, ta = _load(a_dir)
    jb, tb = _load(b_dir)
    arms = [a for a in dict.fromkeys(ta.arm) if a in set(tb.arm)]
    if not arms:
        raise CompareError(f"no arm is in both ablations (A: {sorted(set(ta.arm))}; "
                           f"B: {sorted(set(tb.arm))})")
    frames = []
    for arm in arms:
        ka = ta[(ta.arm == arm) & (ta.seed == ta[ta.arm == arm].seed.min())][KEYS]
        kb = tb[(tb.arm == arm) & (tb.seed == tb[tb.arm == arm].seed.min())][KEYS]
        if len(ka) != len(kb) or not ka.sort_values(KEYS).reset_index(drop=True).equals(
                kb.sort_values(KEYS).reset_index(drop=True)):
            raise CompareError(
                f"arm {arm}: the two ablations scored different test examples ({len(ka)} vs "
                f"{len(kb)} rows): a paired comparison needs one split and one examples "
                "build of the events (same source, split and examples settings)")
        frames.append(ta[ta.arm == arm].assign(arm=f"{label_a}:{arm}"))
        frames.append(tb[tb.arm == arm].assign(arm=f"{label_b}:{arm}"))
    test = pd.concat(frames, ignore_index=True)
    stats = ablation_stats(test, bootstrap, seed, level,
                           [(f"{label_a}:{a}", f"{label_b}:{a}") for a in arms], SLICES)
    rows = []
    for arm in arms:
        for sl in SLICES:
            ra = next((r for r in stats.rows if r["arm"] == f"{label_a}:{arm}"
                       and r["slice"] == sl), None)
            rb = next((r for r in stats.rows if r["arm"] == f"{label_b}:{arm}"
                       and r["slice"] == sl), None)
            if ra is None or rb is None:
                continue
            row = {"arm": arm, "slice": sl, "n": ra["n"], "users": ra["users"],
                   "seeds_a": ra["seeds"], "seeds_b": rb["seeds"]}
            for k in ("auc", "gauc"):
                p = next(p for p in stats.pairs if p["a"] == f"{label_a}:{arm}"
                         and p["slice"] == sl and p["metric"] == k)
                row.update({f"{k}_a": ra[k], f"{k}_b": rb[k], f"{k}_a_ci": ra[f"{k}_ci"],
                            f"{k}_b_ci": rb[f"{k}_ci"], f"{k}_diff": p["diff"],
                            f"{k}_diff_ci": p["ci"], f"{k}_p_le_0": p["p_le_0"]})
            rows.append(row)
    return {"a": str(a_dir), "b": str(b_dir), "label_a": label_a, "label_b": label_b,
            "examples_a": ja.get("examples"), "examples_b": jb.get("examples"),
            "bootstrap": bootstrap, "level": level, "arms": arms, "rows": rows}


def _f(x: float) -> str:
    return "     -" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _d(x: float, ci) -> str:
    if x is None or math.isnan(x):
        return "-"
    lo, hi = ci
    mark = "*" if (lo > 0 or hi < 0) else " "
    return f"{x:+.4f} [{lo:+.4f}, {hi:+.4f}]{mark}"


def format_compare(res: dict, slices=("all", "cold")) -> str:
    from jobs.report import text_table

    a, b = res["label_a"], res["label_b"]
    out = []
    for sl in slices:
        rows = [r for r in res["rows"] if r["slice"] == sl]
        if not rows:
            continue
        out.append(f"test AUC, slice {sl}: {a} (A) vs {b} (B), paired over users "
                   f"({int(res['level'] * 100)}% bootstrap, {res['bootstrap']} resamples; "
                   "* = the interval excludes 0)")
        out.append(text_table(
            [("arm", "s"), ("A AUC", "s"), ("B AUC", "s"), ("A - B", "s"), ("A GAUC", "s"),
             ("B GAUC", "s"), ("A - B GAUC", "s"), ("users", "d")],
            [(r["arm"], _f(r["auc_a"]), _f(r["auc_b"]), _d(r["auc_diff"], r["auc_diff_ci"]),
              _f(r["gauc_a"]), _f(r["gauc_b"]), _d(r["gauc_diff"], r["gauc_diff_ci"]),
              r["users"]) for r in rows]))
    return "\n".join(out)


def write_compare(res: dict) -> Path:
    """Writes ``<A>/compare-<B name>.json`` and ``.txt``; returns the JSON path."""
    path = Path(res["a"]) / f"compare-{Path(res['b']).name}.json"
    path.write_text(json.dumps(res, indent=1, default=float))
    path.with_suffix(".txt").write_text(format_compare(res, ("all", "cold", "known_users",
                                                              "new_users")) + "\n")
    return path


def log_compare(cfg, res: dict) -> None:
    from jobs.tracking import Tracker

    tracker = Tracker(cfg)
    with tracker.run(f"compare {res['label_a']} vs {res['label_b']}",
                     tags={"qarm.kind": "compare"}):
        tracker.params({"a": res["a"], "b": res["b"], "label_a": res["label_a"],
                        "label_b": res["label_b"], "bootstrap": res["bootstrap"]})
        tracker.metrics({f"{r['arm']}.{r['slice']}.auc_diff": r["auc_diff"]
                         for r in res["rows"] if not math.isnan(r["auc_diff"])})
        tracker.artifact_text(json.dumps(res, indent=1, default=float), "compare.json")
