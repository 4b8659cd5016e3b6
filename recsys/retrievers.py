"""Simple retrievers: baselines for the trained towers and fallbacks for a service.

Each scores every item for a batch of users from their positives (oldest first):
``scores(histories) -> [len(histories), n_items]``. Those that start from recent positives use
the last ``recent`` of them.

* ``random``: uniform scores (seeded);
* ``popularity``: training positives per item;
* ``item2item``: the summed Swing/ItemCF pair scores from the recent positives to each item
  (``item_pairs``), ties (items no pair reaches) broken by popularity;
* ``content``: cosine between the mean aligned embedding of the recent positives and each item's;
* ``code_prefix``: how many recent positives share each item's RQ level-1 code, plus how many
  share its level-1..2 prefix, ties broken by popularity. A cold item coded with the current
  codebook (``--assign-only``) is retrievable the same day through its codes, as through its
  content with ``content``.

The ``tower``: the trained retriever's user vector against every item vector (cosine).
"""

from __future__ import annotations

import numpy as np
import torch


def _recent(histories, recent: int) -> list[np.ndarray]:
    return [np.asarray(h[-recent:], np.int64) for h in histories]


def _tiebreak(popularity: np.ndarray) -> torch.Tensor:
    """A popularity order scaled below any real score difference (< 1e-3 in total)."""
    p = np.log1p(popularity.astype(np.float64))
    return torch.from_numpy(1e-3 * p / max(p.max(), 1.0)).float()


class Random:
    def __init__(self, n_items: int, seed: int = 0):
        self.n, self.g = n_items, torch.Generator().manual_seed(seed)

    def scores(self, histories) -> torch.Tensor:
        return torch.rand(len(histories), self.n, generator=self.g)


class Popularity:
    def __init__(self, popularity: np.ndarray):
        self.pop = torch.from_numpy(popularity.astype(np.float32))

    def scores(self, histories) -> torch.Tensor:
        return self.pop.expand(len(histories), -1)


class ItemToItem:
    def __init__(self, src, dst, score, n_items: int, popularity: np.ndarray, recent: int):
        from scipy import sparse

        self.m = sparse.csr_matrix((np.asarray(score, np.float32), (src, dst)),
                                   shape=(n_items, n_items))
        self.n, self.recent, self.tie = n_items, recent, _tiebreak(popularity)

    def scores(self, histories) -> torch.Tensor:
        from scipy import sparse

        rec = _recent(histories, self.recent)
        rows = np.concatenate([np.full(len(r), i) for i, r in enumerate(rec)]).astype(np.int64)
        ind = sparse.csr_matrix((np.ones(len(rows), np.float32),
                                 (rows, np.concatenate(rec) if rec else rows)),
                                shape=(len(rec), self.n))
        s = torch.from_numpy(np.asarray((ind @ self.m).todense(), np.float32))
        return s + self.tie


class Content:
    def __init__(self, embeddings: np.ndarray, recent: int):
        e = torch.from_numpy(embeddings.astype(np.float32))
        self.e = torch.nn.functional.normalize(e, dim=1)       # zero rows stay zero
        self.recent = recent

    def scores(self, histories) -> torch.Tensor:
        q = torch.stack([self.e[torch.from_numpy(r)].mean(0) if len(r) else
                         torch.zeros(self.e.shape[1]) for r in _recent(histories, self.recent)])
        return torch.nn.functional.normalize(q, dim=1) @ self.e.T


class CodePrefix:
    def __init__(self, rq: np.ndarray, codes_per_level: int, popularity: np.ndarray,
                 recent: int):
        c1 = rq[:, 0].astype(np.int64)
        c12 = (rq[:, 0].astype(np.int64) * (codes_per_level + 1) + rq[:, 1]
               if rq.shape[1] > 1 else c1)
        missing = rq[:, 0] < 0
        self.prefixes = [np.where(missing, -1, c1), np.where(missing | (rq[:, min(1, rq.shape[1] - 1)] < 0), -1, c12)]
        self.recent, self.tie = recent, _tiebreak(popularity)

    def scores(self, histories) -> torch.Tensor:
        out = torch.zeros(len(histories), len(self.tie))
        for u, r in enumerate(_recent(histories, self.recent)):
            for codes in self.prefixes:
                mine = codes[r]
                mine = mine[mine >= 0]
                if len(mine):
                    counts = np.bincount(mine, minlength=codes.max() + 1)
                    out[u] += torch.from_numpy(np.where(codes >= 0, counts[np.maximum(codes, 0)],
                                                        0).astype(np.float32))
        return out + self.tie


class Tower:
    """The trained retriever: user vectors from the history, item vectors of every item."""

    def __init__(self, model, feats):
        self.model = model.eval()
        self.raw = model.raw_item_vectors(feats)
        self.items = torch.nn.functional.normalize(self.raw, dim=1)

    def user_vectors(self, histories) -> torch.Tensor:
        return self.model.user_vectors(self.raw, histories)

    def scores(self, histories) -> torch.Tensor:
        return self.user_vectors(histories) @ self.items.T
