"""The two-stage system: a retriever's top-N candidates per test query, re-ranked by the ranker
(which scores them as examples, ``pipelines.candidate_examples``). The re-ranked list is judged
like a retriever's (Recall@K, NDCG@K over the full catalogue: a target the retriever missed
counts as missed)."""

from __future__ import annotations

import numpy as np


def rerank(scores: np.ndarray, query: np.ndarray, items: np.ndarray, n_queries: int,
           width: int) -> np.ndarray:
    """Each query's candidates ordered by ``scores`` (best first), padded with -1."""
    out = np.full((n_queries, width), -1, np.int64)
    order = np.lexsort((-scores, query))
    q_sorted, i_sorted = query[order], items[order]
    starts = np.searchsorted(q_sorted, np.arange(n_queries))
    ends = np.searchsorted(q_sorted, np.arange(n_queries), side="right")
    for u in range(n_queries):
        got = i_sorted[starts[u]:ends[u]][:width]
        out[u, :len(got)] = got
    return out
