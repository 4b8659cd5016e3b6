"""The ablation table: ranking metrics of every arm's scores (and the baselines') on the test part
and, beside it, the validation part, overall and on slices: cold items (no event in the training
part), known users (with training events) and new users (without). Test metrics are averaged
over seeds and carry 95% bootstrap intervals over users; paired differences between arms resample
the same users (``recsys/ablation.py``). Each arm-seed is calibrated on the validation part
(temperature or Platt scaling, fitted on one half of its users; the other half chooses between
them and no map) and the map is applied to the test part. On the synthetic world the ground truth
(the true click probabilities scored as a model) is the ceiling no ranker can beat in
expectation."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pandas as pd

from recsys.ablation import (ABLATION_SLICES, DEFAULT_PAIRS, STAT_METRICS, ablation_stats,
                             calibrate, entropy)
from recsys.metrics import logloss, ranking_metrics

#: The scored parts of the split, in the order the table shows them.
SCORED_PARTS = ("test", "valid")
SLICES = ABLATION_SLICES
TRUTH_ARM = "truth (ceiling)"
METRICS = ("auc", "gauc", "logloss", "ne")


def slice_of(p: pd.DataFrame, name: str) -> pd.DataFrame:
    if name == "cold":
        return p[p.cold]
    if name == "known_users":
        return p[~p.new_user]
    if name == "new_users":
        return p[p.new_user]
    return p


def with_truth(preds: pd.DataFrame, truth: Optional[pd.DataFrame]) -> pd.DataFrame:
    """``preds`` plus the ground truth's rows (seed 0) when ``truth`` covers every example."""
    if truth is None or preds.empty:
        return preds
    first_arm = preds.arm.iloc[0]
    first = preds[(preds.arm == first_arm) & (preds.seed == preds[preds.arm == first_arm]
                                               .seed.min())].reset_index(drop=True)
    p_click = first[["user_id", "item_id", "ts"]].merge(
        truth.drop_duplicates(["user_id", "item_id", "ts"]), on=["user_id", "item_id", "ts"],
        how="left").p_click
    if not p_click.notna().all():
        return preds
    return pd.concat([preds, first.assign(arm=TRUTH_ARM, seed=0, score=p_click.to_numpy())],
                     ignore_index=True)


def evaluate(preds: pd.DataFrame, truth: Optional[pd.DataFrame] = None,
             train_rate: float = math.nan, bootstrap: int = 1000, level: float = 0.95,
             pairs=DEFAULT_PAIRS, seed: int = 0, settings: dict | None = None) -> dict:
    """The whole evaluation as plain data (``ablation.json``): per arm and slice of the test
    part the seed-averaged metrics with intervals, calibrated LogLoss/NE, NE against the
    training base rate, n; the paired differences; the validation part's metrics; and the
    calibration of each arm-seed. ``preds``: ``ranker_predictions`` (arm, seed, part, ...)."""
    preds = with_truth(preds.assign(seed=preds.seed if "seed" in preds else 0), truth)
    arms = list(dict.fromkeys(preds.arm))
    test = preds[preds.part == "test"].copy()
    valid = preds[preds.part == "valid"]
    # Calibration per arm-seed: fitted on the validation part, applied to the test part.
    calib = {}
    test["cal_score"] = test.score.astype("float64")
    for (arm, s), v in valid.groupby(["arm", "seed"], sort=False):
        cal = calibrate(v.user_id.to_numpy(), v.label.to_numpy(), v.score.to_numpy())
        calib[f"{arm}/{s}"] = {"kind": cal.kind, "a": cal.a, "b": cal.b, "applied": cal.kept,
                               "holdout_logloss_before": cal.holdout_before,
                               "holdout_logloss_after": cal.holdout_after}
        m = (test.arm == arm) & (test.seed == s)
        test.loc[m, "cal_score"] = cal.apply(test.loc[m, "score"].to_numpy())
    extra = {}
    h_train = entropy(train_rate) if not math.isnan(train_rate) else math.nan
    for arm in arms:
        for sl in SLICES:
            q = slice_of(test[test.arm == arm], sl)
            if q.empty:
                continue
            # Seed-averaged LogLoss, calibrated and not (ranking_metrics would also compute
            # the AUCs, which the bootstrap below does).
            cal_ll = float(np.mean([logloss(g.label, g.cal_score) for _, g in q.groupby("seed")]))
            ll = float(np.mean([logloss(g.label, g.score) for _, g in q.groupby("seed")]))
            base = entropy(float(q.label.mean()))
            extra[(arm, sl)] = {"cal_logloss": cal_ll, "cal_ne": cal_ll / base,
                                "ne_train": ll / h_train, "cal_ne_train": cal_ll / h_train,
                                **({"settings": settings[arm]} if settings and arm in settings
                                   else {})}
    stats = ablation_stats(test, bootstrap, seed, level, pairs, SLICES, extra)
    valid_rows = []
    for arm in arms:
        for sl in ("all", "cold"):
            q = slice_of(valid[valid.arm == arm], sl)
            if q.empty:
                continue
            per = [ranking_metrics(g.user_id, g.label, g.score) for _, g in q.groupby("seed")]
            valid_rows.append({"arm": arm, "slice": sl, "n": per[0]["examples"],
                               **{k: float(np.mean([p[k] for p in per])) for k in METRICS}})
    first = test[test.arm == arms[0]] if arms else test
    first = first[first.seed == first.seed.min()] if len(first) else first
    gm = ranking_metrics(first.user_id, first.label, first.score) if len(first) else {}
    return {"arms": arms, "seeds": stats.seeds, "bootstrap": bootstrap, "level": level,
            "train_base_rate": train_rate, "test": stats.rows, "pairs": stats.pairs,
            "valid": valid_rows, "calibration": calib,
            "gauc_users": gm.get("gauc_users", 0),
            "gauc_users_one_class": gm.get("gauc_users_one_class", 0)}


def metrics_frame(result: dict) -> pd.DataFrame:
    """One row per (arm, part, slice) with the metrics and interval bounds (the
    ``ranker_metrics`` table)."""
    rows = []
    for r in result["test"]:
        row = {"arm": r["arm"], "part": "test", "slice": r["slice"], "n": r["n"],
               "seeds": r["seeds"]}
        for k in STAT_METRICS:
            row[k] = r[k]
            row[f"{k}_lo"], row[f"{k}_hi"] = r[f"{k}_ci"]
        for k in ("cal_logloss", "cal_ne", "ne_train", "cal_ne_train"):
            row[k] = r.get(k, math.nan)
        rows.append(row)
    for r in result["valid"]:
        rows.append({"arm": r["arm"], "part": "valid", "slice": r["slice"], "n": r["n"],
                     **{k: r[k] for k in METRICS}})
    return pd.DataFrame(rows)


def flat_metrics(result: dict) -> dict[str, float]:
    """``<arm>.<part>.<slice>.<metric>`` and ``diff.<a>-<b>.<slice>.<metric>`` → value."""
    out = {}
    for part in ("test", "valid"):
        for r in result[part]:
            for k in METRICS + (("cal_ne", "ne_train") if part == "test" else ()):
                if k in r and r[k] is not None and not (isinstance(r[k], float)
                                                        and math.isnan(r[k])):
                    out[f"{r['arm']}.{part}.{r['slice']}.{k}"] = float(r[k])
    for p in result["pairs"]:
        out[f"diff.{p['a']}-{p['b']}.{p['slice']}.{p['metric']}"] = float(p["diff"])
    return out


def _get(rows, arm, sl, k):
    r = next((r for r in rows if r["arm"] == arm and r["slice"] == sl), None)
    return math.nan if r is None else r.get(k, math.nan)


def _ci(rows, arm, sl, k):
    r = next((r for r in rows if r["arm"] == arm and r["slice"] == sl), None)
    if r is None:
        return "".rjust(16)
    lo, hi = r[f"{k}_ci"]
    return f"[{lo:.3f}, {hi:.3f}]"


def format_table(result: dict) -> str:
    """The test part's table (with intervals), the paired differences, then the validation
    part's table."""
    t, arms = result["test"], result["arms"]
    n = {sl: _get(t, arms[0], sl, "n") for sl in SLICES} if arms else {}
    seeds = max((len(v) for v in result["seeds"].values()), default=1)
    pct = int(round(result["level"] * 100))

    def count(sl):
        v = n.get(sl, math.nan)
        return 0 if isinstance(v, float) and math.isnan(v) else int(v)

    lines = [f"test part: {count('all')} examples ({count('cold')} on cold items; "
             f"{count('known_users')} of known users, {count('new_users')} of new users); "
             f"metrics averaged over {seeds} seed(s), [{pct}% bootstrap interval over users, "
             f"{result['bootstrap']} resamples]",
             f"{'arm':<16} {'AUC':>7} {'interval':>16} {'GAUC':>7} {'LogLoss':>8} {'NE':>6} "
             f"{'cal NE':>6} {'NEtrn':>6}   {'cold AUC':>8} {'interval':>16}   "
             f"{'known AUC':>9} {'new AUC':>7} {'known cal NE':>12}"]
    for a in arms:
        lines.append(
            f"{a:<16} {_get(t, a, 'all', 'auc'):>7.4f} {_ci(t, a, 'all', 'auc'):>16} "
            f"{_get(t, a, 'all', 'gauc'):>7.4f} {_get(t, a, 'all', 'logloss'):>8.4f} "
            f"{_get(t, a, 'all', 'ne'):>6.3f} {_get(t, a, 'all', 'cal_ne'):>6.3f} "
            f"{_get(t, a, 'all', 'ne_train'):>6.3f}   {_get(t, a, 'cold', 'auc'):>8.4f} "
            f"{_ci(t, a, 'cold', 'auc'):>16}   {_get(t, a, 'known_users', 'auc'):>9.4f} "
            f"{_get(t, a, 'new_users', 'auc'):>7.4f} "
            f"{_get(t, a, 'known_users', 'cal_ne'):>12.3f}")
    pairs = [p for p in result["pairs"] if p["metric"] == "auc"
             and p["slice"] in ("all", "cold")]
    if pairs:
        lines.append(f"paired differences of test AUC (same resampled users for both arms), "
                     f"{pct}% interval:")
        for p in pairs:
            lo, hi = p["ci"]
            lines.append(f"  {p['a'] + ' - ' + p['b']:<28} {p['slice']:<5} {p['diff']:+.4f}  "
                         f"[{lo:+.4f}, {hi:+.4f}]")
    v = result["valid"]
    if v:
        lines.append(f"validation part: {int(_get(v, arms[0], 'all', 'n'))} examples "
                     f"(early stopping and calibration read it)")
        lines.append(f"{'arm':<16} {'AUC':>7} {'GAUC':>7} {'LogLoss':>8} {'NE':>7}   "
                     f"{'cold AUC':>8}")
        for a in arms:
            lines.append(f"{a:<16} {_get(v, a, 'all', 'auc'):>7.4f} "
                         f"{_get(v, a, 'all', 'gauc'):>7.4f} "
                         f"{_get(v, a, 'all', 'logloss'):>8.4f} {_get(v, a, 'all', 'ne'):>7.4f}"
                         f"   {_get(v, a, 'cold', 'auc'):>8.4f}")
    lines.append(f"GAUC: impression-weighted mean of per-user AUC; users with one class only are "
                 f"left out ({result['gauc_users_one_class']} of "
                 f"{result['gauc_users'] + result['gauc_users_one_class']} test users). cal NE: "
                 f"after calibration on the validation part (temperature or Platt, as its "
                 f"held-out half chose); NEtrn: NE against the training base rate.")
    return "\n".join(lines)
