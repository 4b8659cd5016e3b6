"""The ablation table: ranking metrics of every arm's scores on the test part and, beside it, the
validation part, overall and on slices: cold items (no event in the training part), known users
(with training events) and new users (without). On the synthetic world the ground truth (the
true click probabilities scored as a model) is the ceiling no ranker can beat in expectation."""

from __future__ import annotations

from typing import Optional

import pandas as pd

from recsys.metrics import ranking_metrics

#: The scored parts of the split, in the order the table shows them.
SCORED_PARTS = ("test", "valid")
SLICES = ("all", "cold", "known_users", "new_users")
TRUTH_ARM = "truth (ceiling)"
METRICS = ("auc", "gauc", "logloss", "ne")


def _slice(p: pd.DataFrame, name: str) -> pd.DataFrame:
    if name == "cold":
        return p[p.cold]
    if name == "known_users":
        return p[~p.new_user]
    if name == "new_users":
        return p[p.new_user]
    return p


def ablation_metrics(preds: pd.DataFrame, truth: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """One row per (arm, part, slice) with ``ranking_metrics``; ``preds`` is
    ``ranker_predictions``. ``truth`` (user_id, item_id, ts, p_click, dense ids) adds the ground
    truth's rows when it covers every scored example."""
    arms = list(dict.fromkeys(preds.arm))
    scored = {arm: preds[preds.arm == arm] for arm in arms}
    if truth is not None:
        first = scored[arms[0]].reset_index(drop=True)
        p_click = first[["user_id", "item_id", "ts"]].merge(
            truth.drop_duplicates(["user_id", "item_id", "ts"]), on=["user_id", "item_id", "ts"],
            how="left").p_click
        if p_click.notna().all():
            scored[TRUTH_ARM] = first.assign(score=p_click.to_numpy())
    rows = []
    for arm, p in scored.items():
        for part in SCORED_PARTS:
            in_part = p[p.part == part]
            for name in SLICES:
                q = _slice(in_part, name)
                if len(q):
                    rows.append({"arm": arm, "part": part, "slice": name,
                                 **ranking_metrics(q.user_id, q.label, q.score)})
    return pd.DataFrame(rows)


def flat_metrics(df: pd.DataFrame) -> dict[str, float]:
    """``<arm>.<part>.<slice>.<metric>`` → value (for MLflow)."""
    return {f"{r.arm}.{r.part}.{r.slice}.{k}": float(getattr(r, k)) for r in df.itertuples()
            for k in METRICS}


def format_table(df: pd.DataFrame) -> str:
    """The test part's table (overall, cold items, known and new users), then the validation
    part's (overall, cold items)."""
    def get(arm, part, sl, k):
        v = df[(df.arm == arm) & (df.part == part) & (df.slice == sl)]
        return float(v[k].iloc[0]) if len(v) else float("nan")

    def count(part, sl):
        v = df[(df.part == part) & (df.slice == sl)]
        return int(v.examples.iloc[0]) if len(v) else 0

    arms = list(dict.fromkeys(df.arm))
    lines = [f"evaluation examples (test part): {count('test', 'all')} ({count('test', 'cold')} "
             f"on cold items; {count('test', 'known_users')} of known users, "
             f"{count('test', 'new_users')} of new users)",
             f"{'arm':<16} {'AUC':>7} {'GAUC':>7} {'LogLoss':>8} {'NE':>7}   "
             f"{'cold AUC':>8} {'cold GAUC':>9} {'cold LL':>8}   {'known AUC':>9} {'new AUC':>7}"]
    for a in arms:
        lines.append(f"{a:<16} {get(a, 'test', 'all', 'auc'):>7.4f} "
                     f"{get(a, 'test', 'all', 'gauc'):>7.4f} "
                     f"{get(a, 'test', 'all', 'logloss'):>8.4f} {get(a, 'test', 'all', 'ne'):>7.4f}"
                     f"   {get(a, 'test', 'cold', 'auc'):>8.4f} "
                     f"{get(a, 'test', 'cold', 'gauc'):>9.4f} "
                     f"{get(a, 'test', 'cold', 'logloss'):>8.4f}   "
                     f"{get(a, 'test', 'known_users', 'auc'):>9.4f} "
                     f"{get(a, 'test', 'new_users', 'auc'):>7.4f}")
    if count("valid", "all"):
        lines.append(f"validation examples (valid part): {count('valid', 'all')} "
                     f"({count('valid', 'cold')} on cold items)")
        lines.append(f"{'arm':<16} {'AUC':>7} {'GAUC':>7} {'LogLoss':>8} {'NE':>7}   "
                     f"{'cold AUC':>8}")
        for a in arms:
            lines.append(f"{a:<16} {get(a, 'valid', 'all', 'auc'):>7.4f} "
                         f"{get(a, 'valid', 'all', 'gauc'):>7.4f} "
                         f"{get(a, 'valid', 'all', 'logloss'):>8.4f} "
                         f"{get(a, 'valid', 'all', 'ne'):>7.4f}   "
                         f"{get(a, 'valid', 'cold', 'auc'):>8.4f}")
    r = df[(df.part == "test") & (df.slice == "all")].iloc[0]
    lines.append(f"GAUC: impression-weighted mean of per-user AUC; users with one class only are "
                 f"left out ({int(r.gauc_users_one_class)} of "
                 f"{int(r.gauc_users + r.gauc_users_one_class)} test users).")
    return "\n".join(lines)
