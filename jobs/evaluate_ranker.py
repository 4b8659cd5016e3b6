"""The ablation table: ranking metrics of every arm's evaluation scores, overall and on the
cold-item slice; on the synthetic world also the ground truth's (the true click probabilities
scored as a model: the ceiling no ranker can beat in expectation)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from recsys.metrics import ranking_metrics

SLICES = ("all", "cold")


def _truth_scores(ctx, preds: pd.DataFrame) -> pd.Series | None:
    if "truth_events" not in ctx.inputs:
        return None
    store = ctx.store
    truth = store.read_arrow("truth_events", ctx.inputs["truth_events"].snapshot_id).to_pandas()
    imap = store.read_arrow("item_id_map", ctx.inputs["item_id_map"].snapshot_id).to_pandas()
    umap = store.read_arrow("user_id_map", ctx.inputs["user_id_map"].snapshot_id).to_pandas()
    truth["item_id"] = truth.item_id.map(dict(zip(imap.external_id, imap.id)))
    truth["user_id"] = truth.user_id.map(dict(zip(umap.external_id, umap.id)))
    truth = truth.dropna(subset=["item_id", "user_id"]).astype({"item_id": np.int64,
                                                                "user_id": np.int64})
    keyed = preds[["user_id", "item_id", "ts"]].merge(
        truth.drop_duplicates(["user_id", "item_id", "ts"]), on=["user_id", "item_id", "ts"],
        how="left")
    return keyed.p_click


def evaluate_predictions(ctx) -> tuple[str, pa.Table, dict]:
    m = ctx.inputs["ranker_predictions"]
    preds = ctx.store.read_arrow("ranker_predictions", m.snapshot_id).to_pandas()
    arms = list(dict.fromkeys(preds.arm))
    rows = []
    for arm in arms:
        p = preds[preds.arm == arm]
        for sl in SLICES:
            q = p[p.cold] if sl == "cold" else p
            if len(q):
                rows.append({"arm": arm, "slice": sl,
                             **ranking_metrics(q.user_id, q.label, q.score)})
    first = preds[preds.arm == arms[0]].reset_index(drop=True)
    truth = _truth_scores(ctx, first)
    if truth is not None and truth.notna().all():
        for sl in SLICES:
            mask = first.cold.to_numpy() if sl == "cold" else np.ones(len(first), bool)
            if mask.any():
                q = first[mask]
                rows.append({"arm": "truth (ceiling)", "slice": sl,
                             **ranking_metrics(q.user_id, q.label, truth[mask])})
    df = pd.DataFrame(rows)
    metrics = {f"{r.arm}.{r.slice}.{k}": float(getattr(r, k)) for r in df.itertuples()
               for k in ("auc", "gauc", "logloss", "ne")}
    return format_table(df), pa.Table.from_pandas(df, preserve_index=False), metrics


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
