"""Ranking metrics (REFERENCE.md, "Ranking metrics").

* AUC: P(score of a random positive > score of a random negative), ties count 1/2 (computed
  with average ranks, the Mann-Whitney U statistic).
* GAUC: impression-weighted mean of per-user AUC, ``sum_u n_u AUC_u / sum_u n_u`` with ``n_u``
  the user's examples; users whose examples are all positive or all negative have no AUC and
  are left out (their count is reported).
* LogLoss: mean binary cross-entropy (probabilities clipped to [1e-7, 1 - 1e-7]).
* NE: LogLoss divided by the entropy of the base rate (the LogLoss of always predicting the
  mean label); below 1 means better than knowing only the click rate.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.stats import rankdata

EPS = 1e-7


def auc(labels, scores) -> float:
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)               # average ranks: ties count 1/2
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def gauc(users, labels, scores) -> tuple[float, int, int]:
    """(GAUC, users counted, users left out because they have one class only)."""
    df = pd.DataFrame({"u": np.asarray(users), "y": np.asarray(labels).astype(np.int8),
                       "s": np.asarray(scores, dtype=np.float64)})
    total, weight, used, skipped = 0.0, 0, 0, 0
    for _, g in df.groupby("u", sort=False):
        pos = int(g.y.sum())
        if pos == 0 or pos == len(g):
            skipped += 1
            continue
        total += len(g) * auc(g.y.to_numpy(), g.s.to_numpy())
        weight += len(g)
        used += 1
    return (total / weight if weight else float("nan")), used, skipped


def logloss(labels, probs) -> float:
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def normalized_entropy(labels, probs) -> float:
    y = np.asarray(labels, dtype=np.float64)
    base = float(np.clip(y.mean(), EPS, 1 - EPS))
    h = -(base * math.log(base) + (1 - base) * math.log(1 - base))
    return logloss(y, probs) / h


def ranking_metrics(users, labels, scores) -> dict:
    g, used, skipped = gauc(users, labels, scores)
    return {"auc": auc(labels, scores), "gauc": g, "logloss": logloss(labels, scores),
            "ne": normalized_entropy(labels, scores), "examples": int(len(labels)),
            "positives": int(np.asarray(labels).sum()), "gauc_users": used,
            "gauc_users_one_class": skipped}
