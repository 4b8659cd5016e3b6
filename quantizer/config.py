"""Quantizer configuration (plain dataclasses; importing this module imports neither faiss nor
torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class RQConfig:
    levels: int = 3
    codes: int = 256
    niter: int = 20
    seed: int = 0
    max_points_per_centroid: int = 256
    #: ``torch`` (k-means per level, GEMM on torch), ``faiss`` (faiss.Kmeans per level) or
    #: ``faiss_rq`` (faiss.ResidualQuantizer, greedy).
    backend: Literal["torch", "faiss", "faiss_rq"] = "torch"
    balanced: bool = False


@dataclass
class VQConfig:
    k: int = 25
    #: ``ip`` (cosine on unit-norm embeddings) or ``l2``.
    metric: Literal["ip", "l2"] = "ip"
    index: str = "Flat"
    nprobe: int = 16
    #: Pool size: items sampled into the pool (all when smaller).
    pool_size: int = 100_000
    seed: int = 0
