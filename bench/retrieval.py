"""Retrieval benchmarks, printed as JSON:

1. **faiss over item vectors** (default 1M, 32-wide, unit norm, drawn around 2,000 centres so
   approximate indexes have structure to exploit): Flat, IVF and HNSW built on the same vectors
   in one run; per index the build time and, per search setting (IVF nprobe, HNSW efSearch),
   queries per second (batches of 256, this machine's threads) and recall@50 against Flat's
   exact top 50.
2. **retriever training throughput**, 1 rank vs 2 ranks (gloo, DMP), on the same synthetic
   sequences and the same micro-batch per rank (so 2 ranks take a global batch twice as large):
   sequences/s and positions/s over the whole run; one rank runs with one torch thread and
   with two (all of this machine's cores), two ranks with one thread each. The micro-batch is fixed because the
   in-batch softmax's work per step grows with the square of the micro-batch (each position
   scores every distinct item of its rank's batch): at a fixed *global* batch, 2 ranks would do
   half the work and look super-linear.

    .venv/bin/python bench/retrieval.py [--items 1000000] [--queries 2000] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import emit  # noqa: E402

import numpy as np  # noqa: E402


def clustered(n: int, d: int, centres: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32)
    x = c[rng.integers(0, centres, n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


#: Search-time settings tried per index type: recall against speed.
SEARCH = {"IVF": ("nprobe", (4, 16, 64)), "HNSW": ("efSearch", (64, 256, 1024))}


def bench_faiss(n: int, d: int, n_queries: int, factories: list[str], seed: int = 0) -> dict:
    import faiss

    from recsys.index import build_index

    x = clustered(n, d, 2000, seed)
    q = clustered(n_queries, d, 2000, seed + 1)
    out, exact, flat_qps = {}, None, None
    for f in factories:
        t0 = time.perf_counter()
        index = build_index(x, f, seed)
        build_s = time.perf_counter() - t0
        kind = next((k for k in SEARCH if k in f), None)
        param, values = SEARCH[kind] if kind else (None, (None,))
        runs = {}
        for v in values:
            if param:
                faiss.ParameterSpace().set_index_parameter(index, param, v)
            t0 = time.perf_counter()
            ids = np.concatenate([index.search(q[a:a + 256], 50)[1]
                                  for a in range(0, n_queries, 256)])
            qps = n_queries / (time.perf_counter() - t0)
            if exact is None:
                exact, flat_qps = ids, qps
            recall = float(np.mean([len(np.intersect1d(a, b)) / 50
                                    for a, b in zip(ids, exact)]))
            runs[f"{param}={v}" if param else "exact"] = {
                "queries_per_second": round(qps, 1), "recall@50_vs_flat": round(recall, 4),
                "speedup_vs_flat": round(qps / flat_qps, 2)}
        out[f] = {"build_seconds": round(build_s, 2), "search": runs}
    return out


def bench_training(n_items: int, n_seqs: int, steps: int, batch: int) -> dict:
    from recsys.retrieval import ItemFeatures
    from recsys.retrieval_train import RetrievalJob, save_features, train_retriever

    rng = np.random.default_rng(0)
    clusters = 64
    cl = np.arange(n_items) % clusters
    members = [np.flatnonzero(cl == c) for c in range(clusters)]
    seqs = [rng.choice(members[rng.integers(0, clusters)], rng.integers(10, 51))
            for _ in range(n_seqs)]
    pop = np.bincount(np.concatenate(seqs), minlength=n_items)
    rq = [[int(c), int(rng.integers(0, 64)), int(rng.integers(0, 64))] for c in cl]
    vq = [list(rng.choice(members[c], 10)) for c in cl]
    feats = ItemFeatures.build(n_items, np.arange(n_items), rq, vq, 64, pop)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        f = save_features(feats, tmp / "f.npz")
        off = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
        np.savez(tmp / "s.npz", offsets=off, items=np.concatenate(seqs))
        for ranks, threads in ((1, 1), (1, 2), (2, 1)):
            job = RetrievalJob("ids+codes", str(tmp / f"r{ranks}{threads}"), f, "",
                               str(tmp / "s.npz"),
                               "", dim=32, max_len=50, blocks=2, heads=1, dropout=0.2,
                               temperature=0.1, sampled=256, micro_batch=batch,
                               epochs=100, patience=0, valid_every=0, max_steps=steps,
                               sparse_lr=0.1, dense_lr=1e-3, init_scale=0.1, seed=0,
                               world=ranks)
            _, r = train_retriever(job, ranks, quiet=True)
            out[f"{ranks}_rank_{threads}_thread"] = {"sequences_per_second": round(r["sequences_per_second"], 1),
                                    "positions_per_second": round(r["positions_per_second"], 1),
                                    "steps": r["steps"], "global_batch": r["global_batch"],
                                    "final_loss": round(float(np.mean(r["loss_curve"][-10:])),
                                                        4)}
    two = out["2_rank_1_thread"]["sequences_per_second"]
    out["ratio_2_ranks_vs_1_rank_1_thread"] = round(
        two / out["1_rank_1_thread"]["sequences_per_second"], 3)
    out["ratio_2_ranks_vs_1_rank_2_threads"] = round(
        two / out["1_rank_2_thread"]["sequences_per_second"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--factories", nargs="+", default=["Flat", "IVF1024,Flat", "HNSW32"])
    ap.add_argument("--train-items", type=int, default=20000)
    ap.add_argument("--train-sequences", type=int, default=20000)
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--train-batch", type=int, default=128, help="sequences per rank and step")
    ap.add_argument("--out", help="also write the JSON here")
    a = ap.parse_args()
    result = {"faiss": {"items": a.items, "dim": a.dim, "queries": a.queries,
                        "indexes": bench_faiss(a.items, a.dim, a.queries, a.factories)},
              "training": bench_training(a.train_items, a.train_sequences, a.train_steps,
                                         a.train_batch)}
    emit(result, a.out)


if __name__ == "__main__":
    main()
