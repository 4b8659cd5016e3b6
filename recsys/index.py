"""The faiss index over item vectors (inner product; the retriever's vectors are normalised, so
it ranks by cosine) and candidate generation that skips each user's own positives."""

from __future__ import annotations

import numpy as np


class FaissIndexError(ValueError):
    """The index cannot be built with this factory string for these vectors."""


def build_index(vectors: np.ndarray, factory: str = "Flat", seed: int = 0):
    """A faiss index of ``vectors`` ([n, d] float32) from a factory string (``Flat``,
    ``IVF64,Flat``, ``HNSW32``...), trained on the vectors when the type needs training."""
    import faiss

    x = np.ascontiguousarray(vectors, np.float32)
    try:
        index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
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
    n = index.ntotal
    ids_out = np.full((len(queries), k), -1, np.int64)
    sc_out = np.full((len(queries), k), -np.inf, np.float32)
    for a in range(0, len(queries), chunk):
        b = min(a + chunk, len(queries))
        extra = max((len(e) for e in exclude[a:b]), default=0)
        kk = min(n, k + extra)
        scores, ids = index.search(np.ascontiguousarray(queries[a:b], np.float32), kk)
        for r in range(b - a):
            keep = (ids[r] >= 0) & ~np.isin(ids[r], exclude[a + r])
            got = ids[r][keep][:k]
            ids_out[a + r, :len(got)] = got
            sc_out[a + r, :len(got)] = scores[r][keep][:k]
    return ids_out, sc_out
