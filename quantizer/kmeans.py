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
from concurrent.futures import ThreadPoolExecutor
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


def nearest(x: torch.Tensor, c: torch.Tensor, chunk: int = 4096,
            threads: int | None = None) -> torch.Tensor:
    """Index (int64) of each row of ``x`` (n, d)'s nearest centroid in ``c`` (k, d).

    The nearest centroid maximises ``x.c - ||c||^2 / 2`` (``||x||^2`` is the same for every
    centroid), which is one GEMM of ``[x, 1]`` against ``[c, -||c||^2 / 2]``: each chunk of ``x``
    is copied into a reused buffer whose last column is 1, multiplied into a reused score buffer,
    and numpy's SIMD ``argmax`` picks each row's best. ``threads`` workers (default: torch's
    thread count) each run whole chunks on one core. On this 2-core machine that reached 0.77
    (1M x 128) to 0.83 (1M x 256) of the fastest bare GEMM of the same shapes, against 0.53 and
    0.65 for one 2-thread ``addmm`` followed by ``torch.min(dim=1)``, whose row reduction was
    the cost (``bench/rq_fit.py``).
    """
    n, d = x.shape
    k = len(c)
    xn = x.detach().float().contiguous().numpy()
    cf = c.detach().float()
    # [c, -||c||^2 / 2]^T, (d + 1, k): the bias rides in the GEMM instead of a pass over scores.
    ca = torch.cat([cf, -0.5 * (cf * cf).sum(1, keepdim=True)], 1).T.contiguous()
    out = np.empty(n, np.int64)
    starts = range(0, n, chunk)
    rows = min(chunk, n)

    def run(part) -> None:
        xa = np.ones((rows, d + 1), np.float32)
        scores = np.empty((rows, k), np.float32)
        xa_t, scores_t = torch.from_numpy(xa), torch.from_numpy(scores)
        for s in part:
            m = min(chunk, n - s)
            np.copyto(xa[:m, :d], xn[s:s + m])
            torch.mm(xa_t[:m], ca, out=scores_t[:m])
            np.argmax(scores[:m], axis=1, out=out[s:s + m])

    workers = min(threads or torch.get_num_threads(), len(starts))
    if workers <= 1:
        run(starts)
    else:
        on_single_threaded_workers(run, [starts[w::workers] for w in range(workers)])
    return torch.from_numpy(out)


def on_single_threaded_workers(fn, parts: list) -> None:
    """Run ``fn(part)`` for every part, each on its own thread whose torch (OpenMP, MKL) runs on
    one core, so the workers do not oversubscribe the machine. ``torch.set_num_threads`` sets the
    calling thread's OpenMP and MKL counts plus a process-wide default that threads read when
    they first start torch work; that default is restored when the workers finish."""
    before = torch.get_num_threads()

    def single(part) -> None:
        torch.set_num_threads(1)
        fn(part)

    try:
        with ThreadPoolExecutor(len(parts), thread_name_prefix="single-threaded") as pool:
            for f in [pool.submit(single, p) for p in parts]:
                f.result()
    finally:
        torch.set_num_threads(before)


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
            assign = nearest(xt, c, chunk=s.chunk)
        sums = torch.zeros_like(c).index_add_(0, assign, xt)
        counts = torch.bincount(assign, minlength=s.k).to(xt.dtype)
        empty = counts == 0
        c = torch.where(empty.unsqueeze(1), c, sums / counts.clamp(min=1).unsqueeze(1))
        if empty.any():  # re-seed dead centroids on random points (faiss splits big clusters)
            c[empty] = xt[torch.from_numpy(rng.choice(len(xt), int(empty.sum()), replace=False))]
    return c.numpy(), record
