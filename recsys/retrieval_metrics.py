"""Full-ranking evaluation of retrievers: every item is a candidate except the user's own earlier
positives; Recall@K and NDCG@K per user, then bootstrap intervals over users.

A *query* is one user at one moment: the positives before it (oldest first; the user tower's
input and the items excluded from the ranking) and the target positives after it. On a
``per_user`` split with ``test_last_n: 1`` a query has one target (leave-one-out, the
SASRec/UniSRec/TIGER protocol: Recall@K = HR@K). With several targets,
Recall@K = |top-K ∩ targets| / |targets| and NDCG@K = DCG@K / ideal DCG@K (binary relevance,
1/log2(rank + 1)).

Targets that are also earlier positives of the user are dropped (re-consumption is not
retrieval); a query left without targets is not evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

KS_RECALL = (10, 20, 50)
KS_NDCG = (10, 20)


@dataclass
class Queries:
    users: np.ndarray          # [U] user ids
    hist_offsets: np.ndarray   # [U + 1]
    hist_items: np.ndarray     # every earlier positive, oldest first
    tgt_offsets: np.ndarray    # [U + 1]
    tgt_items: np.ndarray

    def __len__(self) -> int:
        return len(self.users)

    def history(self, u: int) -> np.ndarray:
        return self.hist_items[self.hist_offsets[u]:self.hist_offsets[u + 1]]

    def targets(self, u: int) -> np.ndarray:
        return self.tgt_items[self.tgt_offsets[u]:self.tgt_offsets[u + 1]]

    def histories(self) -> list[np.ndarray]:
        return [self.history(u) for u in range(len(self))]

    @classmethod
    def build(cls, users, histories, targets) -> "Queries":
        """From per-user lists; drops targets that are earlier positives and users left with
        none."""
        keep_u, hs, ts = [], [], []
        for u, h, t in zip(users, histories, targets):
            h = np.asarray(h, np.int64)
            t = np.unique(np.setdiff1d(np.asarray(t, np.int64), h))
            if len(t):
                keep_u.append(u), hs.append(h), ts.append(t)

        def packed(lists):
            off = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)
            return off, (np.concatenate(lists) if lists else np.zeros(0, np.int64))

        ho, hi = packed(hs)
        to, ti = packed(ts)
        return cls(np.asarray(keep_u, np.int64), ho, hi, to, ti)

    def only_targets(self, keep: np.ndarray) -> "Queries":
        """The same queries with targets restricted to items where ``keep[item]`` (e.g. cold
        items); queries left without targets are dropped."""
        ts = [t[keep[t]] for t in (self.targets(u) for u in range(len(self)))]
        return Queries.build(self.users, self.histories(), ts)

    def save(self, path: Path) -> None:
        np.savez(path, users=self.users, hist_offsets=self.hist_offsets,
                 hist_items=self.hist_items, tgt_offsets=self.tgt_offsets,
                 tgt_items=self.tgt_items)

    @classmethod
    def load(cls, path) -> "Queries":
        z = np.load(path)
        return cls(*(z[k] for k in ("users", "hist_offsets", "hist_items", "tgt_offsets",
                                    "tgt_items")))


def recall_ndcg(top: np.ndarray, targets: list[np.ndarray], ks_recall=KS_RECALL,
                ks_ndcg=KS_NDCG) -> dict[str, np.ndarray]:
    """Per-query metrics of ranked lists ``top`` [U, >= max K] against ``targets``."""
    U = len(targets)
    out = {f"recall@{k}": np.zeros(U) for k in ks_recall}
    out.update({f"ndcg@{k}": np.zeros(U) for k in ks_ndcg})
    disc = 1.0 / np.log2(np.arange(2, top.shape[1] + 2))
    for u, t in enumerate(targets):
        hit = np.isin(top[u], t)
        for k in ks_recall:
            out[f"recall@{k}"][u] = hit[:k].sum() / len(t)
        for k in ks_ndcg:
            ideal = disc[:min(len(t), k)].sum()
            out[f"ndcg@{k}"][u] = (hit[:k] * disc[:k]).sum() / ideal
    return out


def rank_queries(score: Callable[[np.ndarray], torch.Tensor], q: Queries, n_items: int,
                 k: int = max(KS_RECALL), chunk: int = 256) -> np.ndarray:
    """Top-``k`` item ids per query over all items, the query's earlier positives excluded.
    ``score(query_indices)`` gives the [len, n_items] scores of a chunk of queries."""
    tops = []
    k = min(k, n_items)
    for a in range(0, len(q), chunk):
        idx = np.arange(a, min(a + chunk, len(q)))
        s = score(idx).float().clone()
        rows = np.concatenate([np.full(q.hist_offsets[i + 1] - q.hist_offsets[i], j)
                               for j, i in enumerate(idx)]).astype(np.int64)
        cols = np.concatenate([q.history(i) for i in idx]).astype(np.int64)
        if len(rows):
            s[torch.from_numpy(rows), torch.from_numpy(cols)] = -torch.inf
        tops.append(torch.topk(s, k, dim=1).indices.numpy())
    return np.concatenate(tops) if tops else np.zeros((0, k), np.int64)


def evaluate_queries(score, q: Queries, n_items: int) -> dict[str, np.ndarray]:
    top = rank_queries(score, q, n_items)
    return recall_ndcg(top, [q.targets(u) for u in range(len(q))])


def bootstrap_mean(values: dict[str, np.ndarray], B: int, seed: int = 0, level: float = 0.95
                   ) -> dict[str, tuple[float, float, float]]:
    """Per metric: (mean over queries, interval low, high), resampling queries (users)."""
    from recsys.ablation import percentile_interval, user_resamples

    n = len(next(iter(values.values()))) if values else 0
    if n == 0:
        return {m: (float("nan"),) * 3 for m in values}
    _, counts = user_resamples(np.arange(n), B, seed)
    out = {}
    for m, v in values.items():
        means = counts @ v / n if B else np.zeros(0)
        lo, hi = percentile_interval(means, level) if B else (float("nan"), float("nan"))
        out[m] = (float(v.mean()), lo, hi)
    return out


def paired_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray], B: int,
                      seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float, float]]:
    """a - b per metric over the same queries, both resampled with the same draws."""
    return bootstrap_mean({m: a[m] - b[m] for m in a}, B, seed, level)
