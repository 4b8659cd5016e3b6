"""Quantizer configuration (plain dataclasses; importing this module imports neither faiss nor
torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, Union


def auto_codes(n_items: int) -> int:
    """Codes per RQ level for ``n_items`` items: the power of two nearest sqrt(n), within
    [8, 256]. About sqrt(n) items share a level-1 code and level 1..2 splits them further, so
    codes stay shared (trainable from many items' events) without collapsing."""
    k = 2 ** round(math.log2(max(n_items, 1) ** 0.5))
    return int(min(256, max(8, k)))


@dataclass
class RQConfig:
    levels: int = 3
    #: Codes per level, or ``auto`` (``auto_codes`` of the number of items fitted).
    codes: Union[int, Literal["auto"]] = "auto"
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


def resolve_rq(cfg: RQConfig, n_items: int) -> RQConfig:
    """``cfg`` with ``codes: auto`` replaced by the size for ``n_items`` items."""
    return replace(cfg, codes=auto_codes(n_items)) if cfg.codes == "auto" else cfg
