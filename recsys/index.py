"""The faiss index over item vectors and candidate generation that skips each user's own
positives. The retriever's vectors are unit-norm, so ranking by inner product, by cosine and by
L2 distance agree; unit-norm vectors are indexed with the L2 metric, faiss' native one for every
index type (its HNSW, for one, builds its graph for L2), and the distances are turned back into
cosines. Other vectors are indexed by inner product."""

from __future__ import annotations

import numpy as np


class FaissIndexError(ValueError):
    """The index cannot be built with this factory string for these vectors."""


def build_index(vectors: np.ndarray, factory: str = "Flat", seed: int = 0):
    """A faiss index of ``vectors`` ([n, d] float32) from a factory string (``Flat``,
    ``IVF64,Flat``, ``HNSW32``...), trained on the vectors when the type needs training."""
    import faiss

    x = np.ascontiguousarray(vectors, np.float32)
    unit = len(x) > 0 and bool(np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-3))
    metric = faiss.METRIC_L2 if unit else faiss.METRIC_INNER_PRODUCT
    try:
        index = faiss.index_factory(x.shape[1], factory, metric)
    except RuntimeError as e:
        raise FaissIndexError(f"retrieval.index {factory!r} is not a faiss index factory string "
                          f"faiss can build for {x.shape[1]}-wide vectors: "
                          f"{str(e).splitlines()[-1]}") from None
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            if ivf.nlist > len(x):
                raise FaissIndexError(f"retrieval.index {factory!r} has {ivf.nlist} lists for "
                                  f"{len(x)} items: use fewer lists (IVF{max(1, len(x) // 39)},"
                                  f"Flat) or Flat")
            ivf.cp.seed = seed
        index.train(x)
    index.add(x)
    return index


def search_excluding(index, queries: np.ndarray, k: int, exclude: list[np.ndarray],
                     chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (ids, scores) per query, never an id in the query's ``exclude``; rows are
    padded with -1 / -inf where the index returns fewer."""
    import faiss

    n = index.ntotal
    ids_out = np.full((len(queries), k), -1, np.int64)
    sc_out = np.full((len(queries), k), -np.inf, np.float32)
    for a in range(0, len(queries), chunk):
        b = min(a + chunk, len(queries))
        extra = max((len(e) for e in exclude[a:b]), default=0)
        kk = min(n, k + extra)
        scores, ids = index.search(np.ascontiguousarray(queries[a:b], np.float32), kk)
        if index.metric_type == faiss.METRIC_L2:
            # Unit-norm vectors: ||q - x||^2 = 2 - 2 cos; scores are the cosines.
            scores = 1.0 - scores / 2.0
        for r in range(b - a):
            keep = (ids[r] >= 0) & ~np.isin(ids[r], exclude[a + r])
            got = ids[r][keep][:k]
            ids_out[a + r, :len(got)] = got
            sc_out[a + r, :len(got)] = scores[r][keep][:k]
    return ids_out, sc_out
