"""Embedding evaluation: retrieval of held-out behaviour partners, and nearest-neighbour purity.

Retrieval: for a held-out pair (src, dst), rank every item except src by cosine to src; the pair
is a hit at K when dst ranks within the top K. Recall@K = share of hits; NDCG@K with one relevant
item = mean of 1 / log2(1 + rank) over hits. Purity: for each item, the share of its k nearest
neighbours (itself excluded) with the same label; chance level is sum_c p_c^2.
"""

from __future__ import annotations

import numpy as np


def _index(vectors: np.ndarray):
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def retrieval_metrics(ids: np.ndarray, vectors: np.ndarray, src: np.ndarray, dst: np.ndarray,
                      k: int = 10) -> dict:
    """Recall@k and NDCG@k of finding ``dst`` from ``src`` (item ids) among all ``ids``."""
    pos = {int(i): n for n, i in enumerate(ids)}
    keep = [(pos[s], pos[d]) for s, d in zip(src, dst) if int(s) in pos and int(d) in pos]
    if not keep:
        return {f"recall@{k}": float("nan"), f"ndcg@{k}": float("nan"), "pairs": 0}
    qs, ts = np.array(keep).T
    _, nn = _index(vectors).search(np.ascontiguousarray(vectors[qs], dtype=np.float32), k + 1)
    hits, gains = 0, 0.0
    for q, t, row in zip(qs, ts, nn):
        row = [r for r in row if r != q][:k]
        if t in row:
            hits += 1
            gains += 1.0 / np.log2(2 + row.index(t))
    return {f"recall@{k}": hits / len(qs), f"ndcg@{k}": gains / len(qs), "pairs": int(len(qs))}


def knn_purity(vectors: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """Mean share of each item's k nearest neighbours (itself excluded) sharing its label."""
    _, nn = _index(vectors).search(np.ascontiguousarray(vectors, dtype=np.float32), k + 1)
    same = []
    for i, row in enumerate(nn):
        row = [r for r in row if r != i][:k]
        same.append(np.mean(labels[row] == labels[i]))
    return float(np.mean(same))


def chance_purity(labels: np.ndarray) -> float:
    _, counts = np.unique(labels, return_counts=True)
    p = counts / counts.sum()
    return float((p ** 2).sum())


def compare_retrieval(raw: tuple[np.ndarray, np.ndarray], aligned: tuple[np.ndarray, np.ndarray],
                      pair_sets: dict[str, tuple[np.ndarray, np.ndarray]], k: int = 10
                      ) -> list[dict]:
    """Recall@k / NDCG@k of each held-out pair set (name → (src ids, dst ids)) with the raw and
    the aligned embeddings, each given as (ids, vectors)."""
    rows = []
    for name, (src, dst) in pair_sets.items():
        r = retrieval_metrics(*raw, src, dst, k)
        a = retrieval_metrics(*aligned, src, dst, k)
        rows.append({"pairs": name, "n": r["pairs"], "recall_raw": r[f"recall@{k}"],
                     "recall_aligned": a[f"recall@{k}"], "ndcg_raw": r[f"ndcg@{k}"],
                     "ndcg_aligned": a[f"ndcg@{k}"]})
    return rows


def compare_purity(raw: np.ndarray, aligned: np.ndarray, labels: dict[str, np.ndarray],
                   k: int = 10) -> list[dict]:
    """k-NN purity of each labelling (attribute → one label per row) with the raw and the aligned
    embeddings (rows in the same item order), and its chance level."""
    return [{"attribute": attr, "raw": knn_purity(raw, y, k), "aligned": knn_purity(aligned, y, k),
             "chance": chance_purity(y)} for attr, y in labels.items()]
