"""k-means for codebooks, with the assignment step on a fast GEMM.

The assignment step (every point against every centroid) is one matrix product per chunk:
``||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2``. The faiss-cpu wheel runs that product on an old
bundled OpenBLAS that reaches a fraction of this machine's sgemm speed (see REFERENCE.md, BLAS
facts), so the default backend runs it with torch (MKL); ``backend="faiss"`` uses
``faiss.Kmeans`` for comparison. Both subsample the training set to
``max_points_per_centroid * k`` points, like faiss, and record what they did.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)


class TooFewPoints(ValueError):
    """k-means was asked for more centroids than there are points."""


@dataclass
class KMeansSettings:
    k: int
    niter: int = 20
    seed: int = 0
    #: Training points are subsampled to this many per centroid (faiss' default is 256).
    max_points_per_centroid: int = 256
    #: ``torch`` (GEMM on torch's BLAS) or ``faiss`` (faiss.Kmeans).
    backend: str = "torch"
    #: Balanced training assignment (Sinkhorn-equalised cluster sizes); encoding stays greedy.
    balanced: bool = False
    #: Rows per GEMM chunk in the assignment step.
    chunk: int = 4096


def nearest(x: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor | None = None,
            chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Index and squared distance of each row of ``x`` (n, d)'s nearest centroid in ``c`` (k, d)."""
    c_sq = (c * c).sum(1) if c_sq is None else c_sq
    idx = torch.empty(len(x), dtype=torch.int64)
    dist = torch.empty(len(x), dtype=x.dtype)
    for s in range(0, len(x), chunk):
        xb = x[s:s + chunk]
        # argmin ||x||^2 - 2 x.c + ||c||^2 over c; ||x||^2 is constant per row.
        scores = torch.addmm(c_sq.unsqueeze(0), xb, c.T, beta=1.0, alpha=-2.0)
        best, arg = scores.min(dim=1)
        idx[s:s + chunk] = arg
        dist[s:s + chunk] = (best + (xb * xb).sum(1)).clamp_(min=0)
    return idx, dist


def _sinkhorn_assign(x: torch.Tensor, c: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Assignment with equalised cluster sizes: Sinkhorn on exp(-d / temperature)."""
    d = torch.cdist(x, c).pow(2)
    logp = -d / d.mean().clamp(min=1e-12) * 10
    for _ in range(iters):
        logp = logp - torch.logsumexp(logp, dim=0, keepdim=True)  # columns: equal mass
        logp = logp - torch.logsumexp(logp, dim=1, keepdim=True)  # rows: one unit each
    return logp.argmax(dim=1)


def train_kmeans(x: np.ndarray, s: KMeansSettings) -> tuple[np.ndarray, dict]:
    """Fit ``s.k`` centroids to ``x`` (n, d) float32. Returns (centroids (k, d), record)."""
    n, d = x.shape
    if n < s.k:
        raise TooFewPoints(f"k-means with k={s.k} centroids needs at least {s.k} points, got {n}: "
                           f"use fewer codes (quantize.rq.codes) for so few items")
    rng = np.random.default_rng(s.seed)
    cap = s.max_points_per_centroid * s.k
    sample = x if n <= cap else x[np.sort(rng.choice(n, cap, replace=False))]
    record = {"backend": s.backend, "k": s.k, "niter": s.niter, "seed": s.seed,
              "max_points_per_centroid": s.max_points_per_centroid,
              "train_points": int(len(sample)), "balanced": s.balanced}
    if len(sample) < 39 * s.k:
        log.warning("k-means with %d points for %d centroids (< 39 per centroid): codes will "
                    "be noisy", len(sample), s.k)
    if s.backend == "faiss":
        import faiss

        km = faiss.Kmeans(d, s.k, niter=s.niter, seed=s.seed, verbose=False,
                          max_points_per_centroid=s.max_points_per_centroid)
        km.train(np.ascontiguousarray(sample, dtype=np.float32))
        return np.asarray(km.centroids, np.float32), record
    if s.backend != "torch":
        raise ValueError(f"k-means backend must be torch or faiss, got {s.backend!r}")
    xt = torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32))
    c = xt[torch.from_numpy(rng.choice(len(xt), s.k, replace=False))].clone()
    for _ in range(s.niter):
        if s.balanced:
            assign = _sinkhorn_assign(xt, c)
        else:
            assign, _ = nearest(xt, c, chunk=s.chunk)
        sums = torch.zeros_like(c).index_add_(0, assign, xt)
        counts = torch.bincount(assign, minlength=s.k).to(xt.dtype)
        empty = counts == 0
        c = torch.where(empty.unsqueeze(1), c, sums / counts.clamp(min=1).unsqueeze(1))
        if empty.any():  # re-seed dead centroids on random points (faiss splits big clusters)
            c[empty] = xt[torch.from_numpy(rng.choice(len(xt), int(empty.sum()), replace=False))]
    return c.numpy(), record
