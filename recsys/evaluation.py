"""The ablation table: ranking metrics of every arm's evaluation scores, overall and on the
cold-item slice; on the synthetic world also the ground truth's (the true click probabilities
scored as a model: the ceiling no ranker can beat in expectation)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd

from recsys.metrics import ranking_metrics

SLICES = ("all", "cold")
TRUTH_ARM = "truth (ceiling)"


def ablation_metrics(preds: pd.DataFrame, truth: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """One row per (arm, slice) with ``ranking_metrics``; ``preds`` is ``ranker_predictions``.

    ``truth`` (user_id, item_id, ts, p_click, dense ids) adds the ground truth's row when it
    covers every evaluation example."""
    arms = list(dict.fromkeys(preds.arm))
    rows = []
    for arm in arms:
        p = preds[preds.arm == arm]
        for sl in SLICES:
            q = p[p.cold] if sl == "cold" else p
            if len(q):
                rows.append({"arm": arm, "slice": sl,
                             **ranking_metrics(q.user_id, q.label, q.score)})
    if truth is not None:
        first = preds[preds.arm == arms[0]].reset_index(drop=True)
        p_click = first[["user_id", "item_id", "ts"]].merge(
            truth.drop_duplicates(["user_id", "item_id", "ts"]), on=["user_id", "item_id", "ts"],
            how="left").p_click
        if p_click.notna().all():
            for sl in SLICES:
                mask = first.cold.to_numpy() if sl == "cold" else np.ones(len(first), bool)
                if mask.any():
                    q = first[mask]
                    rows.append({"arm": TRUTH_ARM, "slice": sl,
                                 **ranking_metrics(q.user_id, q.label, p_click[mask])})
    return pd.DataFrame(rows)


def flat_metrics(df: pd.DataFrame) -> dict[str, float]:
    """``<arm>.<slice>.<metric>`` → value (for MLflow)."""
    return {f"{r.arm}.{r.slice}.{k}": float(getattr(r, k)) for r in df.itertuples()
            for k in ("auc", "gauc", "logloss", "ne")}


def format_table(df: pd.DataFrame) -> str:
    def get(arm, sl, k):
        v = df[(df.arm == arm) & (df.slice == sl)]
        return float(v[k].iloc[0]) if len(v) else float("nan")

    arms = list(dict.fromkeys(df.arm))
    n_all = int(df[df.slice == "all"].examples.iloc[0])
    n_cold = int(df[df.slice == "cold"].examples.iloc[0]) if (df.slice == "cold").any() else 0
    lines = [f"evaluation examples: {n_all} ({n_cold} on cold items)",
             f"{'arm':<16} {'AUC':>7} {'GAUC':>7} {'LogLoss':>8} {'NE':>7}   "
             f"{'cold AUC':>8} {'cold GAUC':>9} {'cold LL':>8}"]
    for a in arms:
        lines.append(f"{a:<16} {get(a, 'all', 'auc'):>7.4f} {get(a, 'all', 'gauc'):>7.4f} "
                     f"{get(a, 'all', 'logloss'):>8.4f} {get(a, 'all', 'ne'):>7.4f}   "
                     f"{get(a, 'cold', 'auc'):>8.4f} {get(a, 'cold', 'gauc'):>9.4f} "
                     f"{get(a, 'cold', 'logloss'):>8.4f}")
    r = df[df.slice == "all"].iloc[0]
    lines.append(f"GAUC: impression-weighted mean of per-user AUC; users with one class only are "
                 f"left out ({int(r.gauc_users_one_class)} of "
                 f"{int(r.gauc_users + r.gauc_users_one_class)} users overall).")
    return "\n".join(lines)
