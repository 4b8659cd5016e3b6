"""VQ: an item's code is the set of its K nearest items in a pool of embeddings (QARM).

The pool is a faiss index over (aligned) item embeddings; codes are pool positions (int32, the
vocabulary of the ranker's VQ table). If the item itself is in the pool it is excluded, or its
code would degenerate into its own id. ``index`` is a faiss factory string: ``Flat`` (exact,
default) or e.g. ``IVF256,Flat`` with ``nprobe`` for large pools.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from quantizer.config import VQConfig


@dataclass
class NeighbourCodes:
    cfg: VQConfig = field(default_factory=VQConfig)
    pool_ids: np.ndarray | None = None        # (P,) int64 item ids
    pool_vectors: np.ndarray | None = None    # (P, d) float32

    def fit(self, ids: np.ndarray, vectors: np.ndarray) -> "NeighbourCodes":
        """Choose the pool (a seeded sample of at most ``pool_size`` items) and index it."""
        ids = np.asarray(ids, np.int64)
        if len(ids) > self.cfg.pool_size:
            keep = np.sort(np.random.default_rng(self.cfg.seed).choice(
                len(ids), self.cfg.pool_size, replace=False))
            ids, vectors = ids[keep], vectors[keep]
        order = np.argsort(ids, kind="stable")
        self.pool_ids = ids[order]
        self.pool_vectors = np.ascontiguousarray(vectors[order], dtype=np.float32)
        self._index = None
        return self

    @property
    def index(self):
        if getattr(self, "_index", None) is None:
            self._index = build_index(self.pool_vectors, self.cfg)
        return self._index

    def search(self, vectors: np.ndarray, k: int) -> np.ndarray:
        """(n, k) pool positions of the nearest pool vectors (-1 where fewer exist)."""
        _, pos = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        return pos

    def encode(self, ids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """(n, k) int32 pool positions of each item's nearest pool items, itself excluded.

        Rows with fewer than k valid neighbours (a pool smaller than k + 1) are padded with -1.
        """
        k = self.cfg.k
        pos = self.search(vectors, k + 1)
        ids = np.asarray(ids, np.int64)
        valid = pos >= 0
        pos_ids = np.where(valid, self.pool_ids[np.clip(pos, 0, None)], -1)
        is_self = (pos_ids == ids[:, None]) & valid
        keep = valid & ~is_self
        # Keep the first k kept entries of each row, in rank order.
        rank = np.cumsum(keep, axis=1)
        out = np.full((len(ids), k), -1, np.int32)
        rows, cols = np.nonzero(keep & (rank <= k))
        out[rows, rank[rows, cols] - 1] = pos[rows, cols]
        return out

    def config_dict(self) -> dict:
        return asdict(self.cfg)


def build_index(vectors: np.ndarray, cfg: VQConfig):
    import faiss

    d = vectors.shape[1]
    metric = faiss.METRIC_INNER_PRODUCT if cfg.metric == "ip" else faiss.METRIC_L2
    index = faiss.index_factory(d, cfg.index, metric)
    if not index.is_trained:
        index.train(vectors)
    index.add(vectors)
    if hasattr(index, "nprobe"):
        index.nprobe = cfg.nprobe
    return index


def exact_overlap(vq: NeighbourCodes, ids: np.ndarray, vectors: np.ndarray) -> float:
    """Mean share of each item's VQ code that an exact (flat) search would also give."""
    exact = NeighbourCodes(VQConfig(**{**asdict(vq.cfg), "index": "Flat"}), vq.pool_ids,
                           vq.pool_vectors)
    a, b = vq.encode(ids, vectors), exact.encode(ids, vectors)
    inter = [len(set(x[x >= 0]) & set(y[y >= 0])) / max(1, (y >= 0).sum()) for x, y in zip(a, b)]
    return float(np.mean(inter)) if inter else 1.0
