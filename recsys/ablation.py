"""The ablation's statistics: seed-averaged metrics with bootstrap intervals over users, paired
differences between arms, and calibration.

* **Intervals.** Users are resampled with replacement (``B`` times); a resampled user brings all
  of their examples, weighted by how often they were drawn. For each resample the metric is
  computed per seed and averaged over seeds; the interval is the 2.5th and 97.5th percentile of
  those averages (95%), the point estimate the seed-averaged metric on all users.
* **Paired differences** (arm A minus arm B) use the same resamples for both arms, so the users
  that are hard for both cancel out.
* **Calibration**: temperature scaling (``sigmoid(a * logit(p))``) and Platt scaling
  (``sigmoid(a * logit(p) + b)``) are fitted on one half of the validation part's users; the
  other half keeps whichever of the two (or no map) gives it the lowest LogLoss, so calibration
  is never worse there. The chosen map is applied to the test part. Platt's intercept also
  moves the predictions' level to the validation part's base rate, which helps where later
  events look like the validation part and hurts where its rate is not theirs (a global time
  split whose validation period has a different mix of users); the slope alone does not move
  the level.
* **NE** is reported against the scored slice's own base rate (``ne``) and against the training
  part's (``ne_train``), which is the rate a deployed model would know.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from recsys.metrics import EPS

#: Slices of the test part the ablation reports (see recsys.evaluation).
ABLATION_SLICES = ("all", "cold", "known_users", "new_users")
#: Paired differences reported by default: (arm A, arm B) → A − B.
DEFAULT_PAIRS = (("codes", "frozen_aligned"), ("codes", "codes_raw"),
                 ("frozen_aligned", "frozen_mm"), ("codes", "id_only"))
STAT_METRICS = ("auc", "gauc", "logloss", "ne")


# --------------------------------------------------------------------------- weighted metrics


class Scored:
    """One arm-seed's scores on one slice, prepared for fast weighted metrics. ``pos`` gives
    each example's user as an index into the slice's user list; a bootstrap resample is a count
    per user."""

    def __init__(self, pos: np.ndarray, labels: np.ndarray, scores: np.ndarray):
        self.pos = np.asarray(pos, np.int64)
        self.y = np.asarray(labels, np.float64)
        self.s = np.asarray(scores, np.float64)
        self.uniq, self.inv = np.unique(self.s, return_inverse=True)   # ties share a bucket
        p = np.clip(self.s, EPS, 1 - EPS)
        self.ll = -(self.y * np.log(p) + (1 - self.y) * np.log(1 - p))
        # Per-user AUC (GAUC): users with one class have none.
        df = pd.DataFrame({"u": self.pos, "y": self.y, "s": self.s})
        users, aucs, ns = [], [], []
        for u, g in df.groupby("u", sort=True):
            pos_n = g.y.sum()
            if 0 < pos_n < len(g):
                users.append(u)
                aucs.append(weighted_auc(g.y.to_numpy(), g.s.to_numpy()))
                ns.append(len(g))
        self.auc_users = np.asarray(users, np.int64)
        self.auc_weighted = np.asarray(aucs) * np.asarray(ns, np.float64)
        self.auc_n = np.asarray(ns, np.float64)

    def metrics(self, user_counts: np.ndarray | None = None) -> dict[str, float]:
        """Metrics with each user's examples counted ``user_counts[user]`` times (None: once)."""
        if user_counts is None:
            ex_w = np.ones(len(self.y))
            uc = np.ones(len(self.auc_users))
        else:
            ex_w = user_counts[self.pos].astype(np.float64)
            uc = user_counts[self.auc_users].astype(np.float64)
        yw = ex_w * self.y
        pos = np.bincount(self.inv, yw, len(self.uniq))
        neg = np.bincount(self.inv, ex_w - yw, len(self.uniq))
        P, N = pos.sum(), neg.sum()
        below = np.cumsum(neg) - neg
        a = float((pos * (below + 0.5 * neg)).sum() / (P * N)) if P > 0 and N > 0 else math.nan
        W = ex_w.sum()
        ll = float((ex_w * self.ll).sum() / W)
        den = float(uc @ self.auc_n)
        return {"auc": a, "gauc": float(uc @ self.auc_weighted) / den if den else math.nan,
                "logloss": ll, "ne": ll / entropy(P / W)}


def weighted_auc(labels, scores, weights=None) -> float:
    """AUC with example weights (a weight of k counts the example k times); ties count 1/2."""
    y = np.asarray(labels, np.float64)
    w = np.ones_like(y) if weights is None else np.asarray(weights, np.float64)
    uniq, inv = np.unique(np.asarray(scores, np.float64), return_inverse=True)
    pos = np.bincount(inv, w * y, len(uniq))
    neg = np.bincount(inv, w * (1 - y), len(uniq))
    P, N = pos.sum(), neg.sum()
    if P == 0 or N == 0:
        return math.nan
    below = np.cumsum(neg) - neg
    return float((pos * (below + 0.5 * neg)).sum() / (P * N))


# --------------------------------------------------------------------------- bootstrap


def user_resamples(users: np.ndarray, B: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(unique users, counts [B, n_users]): how often each resample drew each user."""
    uniq = np.unique(users)
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, len(uniq), len(uniq)), minlength=len(uniq))
                       for _ in range(B)]) if B else np.zeros((0, len(uniq)), np.int64)
    return uniq, counts


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    if not len(v):
        return math.nan, math.nan
    lo = (1 - level) / 2
    return float(np.quantile(v, lo)), float(np.quantile(v, 1 - lo))


@dataclass
class AblationStats:
    """Per (arm, slice): metrics, intervals, n; per pair and slice: differences with intervals."""
    rows: list[dict] = field(default_factory=list)
    pairs: list[dict] = field(default_factory=list)
    seeds: dict[str, list[int]] = field(default_factory=dict)
    bootstrap: int = 0
    level: float = 0.95


def ablation_stats(test: pd.DataFrame, B: int = 1000, seed: int = 0, level: float = 0.95,
                   pairs=DEFAULT_PAIRS, slices=ABLATION_SLICES,
                   extra: dict[tuple[str, str], dict] | None = None) -> AblationStats:
    """``test``: predictions of the test part (arm, seed, user_id, label, score, cold,
    new_user). Seeds are averaged per arm; every arm resamples the same users.
    ``extra[(arm, slice)]`` is merged into that row (calibration, settings...)."""
    from recsys.evaluation import slice_of

    arms = list(dict.fromkeys(test.arm))
    out = AblationStats(bootstrap=B, level=level)
    for arm in arms:
        out.seeds[arm] = sorted(int(s) for s in test[test.arm == arm].seed.unique())
    for sl in slices:
        part = slice_of(test, sl)
        if part.empty:
            continue
        uniq, counts = user_resamples(part.user_id.to_numpy(), B, seed)
        dist: dict[str, dict[str, np.ndarray]] = {}
        for arm in arms:
            per_seed = []
            for s in out.seeds[arm]:
                q = part[(part.arm == arm) & (part.seed == s)]
                if q.empty:
                    continue
                sc = Scored(np.searchsorted(uniq, q.user_id.to_numpy()), q.label.to_numpy(),
                            q.score.to_numpy())
                point = sc.metrics()
                boot = {k: np.empty(B) for k in STAT_METRICS}
                for b in range(B):
                    m = sc.metrics(counts[b])
                    for k in STAT_METRICS:
                        boot[k][b] = m[k]
                per_seed.append((point, boot, len(q)))
            if not per_seed:
                continue
            point = {k: float(np.mean([p[0][k] for p in per_seed])) for k in STAT_METRICS}
            boot = {k: np.mean([p[1][k] for p in per_seed], axis=0) for k in STAT_METRICS}
            dist[arm] = boot
            row = {"arm": arm, "slice": sl, "n": per_seed[0][2],
                   "users": int(part[part.arm == arm].user_id.nunique()),
                   "seeds": len(per_seed), **point}
            for k in STAT_METRICS:
                row[f"{k}_ci"] = list(percentile_interval(boot[k], level))
            if extra and (arm, sl) in extra:
                row.update(extra[(arm, sl)])
            out.rows.append(row)
        for a, b in pairs:
            if a in dist and b in dist:
                for k in ("auc", "gauc"):
                    pa_ = next(r for r in out.rows if r["arm"] == a and r["slice"] == sl)[k]
                    pb_ = next(r for r in out.rows if r["arm"] == b and r["slice"] == sl)[k]
                    d = dist[a][k] - dist[b][k]
                    lo, hi = percentile_interval(d, level)
                    out.pairs.append({"a": a, "b": b, "slice": sl, "metric": k,
                                      "diff": pa_ - pb_, "ci": [lo, hi],
                                      "p_le_0": float(np.mean(d[~np.isnan(d)] <= 0))
                                      if B else math.nan})
    return out


# --------------------------------------------------------------------------- calibration


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    return np.log(p / (1 - p))


def _ll(y, p) -> float:
    p = np.clip(p, EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


@dataclass
class Calibration:
    a: float = 1.0
    b: float = 0.0
    #: LogLoss of the held-out half before and after; ``kept`` False when the identity stayed.
    holdout_before: float = math.nan
    holdout_after: float = math.nan
    kept: bool = False
    #: ``none``, ``temperature`` (b = 0) or ``platt``.
    kind: str = "none"

    def apply(self, p) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(self.a * _logit(p) + self.b)))


def user_half(users) -> np.ndarray:
    """A fixed split of users into halves (by a hash of the id, stable across runs)."""
    return np.array([hashlib.blake2b(str(u).encode(), digest_size=2).digest()[0] & 1
                     for u in np.asarray(users)], bool)


def fit_platt(labels, scores, intercept: bool = True) -> tuple[float, float]:
    """(a, b) minimising the LogLoss of ``sigmoid(a * logit(score) + b)``; with
    ``intercept=False``, b = 0 (temperature scaling, a = 1 / temperature)."""
    from scipy.optimize import minimize

    y = np.asarray(labels, np.float64)
    z = _logit(scores)

    def f(ab):
        t = ab[0] * z + (ab[1] if intercept else 0.0)
        # log(1 + e^t) - y t, stable
        val = np.logaddexp(0, t) - y * t
        g = 1 / (1 + np.exp(-t)) - y
        return val.mean(), np.array([(g * z).mean(), g.mean() if intercept else 0.0])

    res = minimize(f, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B")
    return float(res.x[0]), float(res.x[1]) if intercept else 0.0


def calibrate(users, labels, scores) -> Calibration:
    """Temperature and Platt scaling fitted on one half of the validation users; the other half
    keeps the one with the lower LogLoss, or the identity unless one lowers it."""
    y = np.asarray(labels, np.float64)
    s = np.asarray(scores, np.float64)
    half = user_half(users)
    fit, hold = ~half, half
    if not fit.any() or not hold.any() or y[fit].min() == y[fit].max():
        return Calibration()
    before = _ll(y[hold], s[hold])
    best = Calibration(1.0, 0.0, before, before, False, "none")
    for kind, (a, b) in (("temperature", fit_platt(y[fit], s[fit], intercept=False)),
                         ("platt", fit_platt(y[fit], s[fit]))):
        after = _ll(y[hold], Calibration(a, b).apply(s[hold]))
        if after < best.holdout_after:
            best = Calibration(a, b, before, after, True, kind)
    return best


def entropy(rate: float) -> float:
    r = float(np.clip(rate, EPS, 1 - EPS))
    return -(r * math.log(r) + (1 - r) * math.log(1 - r))
