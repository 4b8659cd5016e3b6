"""Random ranker examples on disk (real Parquet in the examples schema), for tests and benchmarks:
the label depends on whether the item's level-1 code is the user's preferred one, so a model can
learn it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from feature_store.schemas import examples_schema


def random_examples(n: int, *, n_items: int = 50, n_users: int = 20, levels: int = 2,
                    codes: int = 8, vq_k: int = 3, hist: int = 5, frozen_dim: int = 4,
                    seed: int = 0, zipf: float = 0.0) -> pa.Table:
    """Examples whose label depends on the item's level-1 code and the user, so a model can
    learn something; ids are dense. ``zipf`` > 0 draws users and items (target, history, VQ)
    with probability proportional to popularity rank ** -zipf, as behaviour logs are (0:
    uniform); the ranks are a fixed shuffle of the ids (an id's number says nothing of its
    popularity, as with ids assigned at ingestion)."""
    item_rq = np.random.default_rng(1000).integers(0, codes, (n_items, levels)).astype(np.int32)
    rng = np.random.default_rng(seed)

    def draw(size, k):
        if not zipf:
            return rng.integers(0, k, size)
        p = np.arange(1, k + 1, dtype=np.float64) ** -zipf
        by_rank = np.random.default_rng(1002 + k).permutation(k)
        return by_rank[rng.choice(k, size=size, p=p / p.sum())]

    users = draw(n, n_users)
    items = draw(n, n_items)
    pref = rng.integers(0, codes, n_users)
    p = np.where(item_rq[items, 0] == pref[users], 0.8, 0.15)
    label = (rng.random(n) < p).astype(np.int8)
    lens = rng.integers(0, hist + 1, n)
    flat = draw(int(lens.sum()), n_items)
    hist_items = np.split(flat, np.cumsum(lens)[:-1])
    vq = list(draw((n, vq_k), n_items).astype(np.int32))
    frozen = frozen_table(n_items, frozen_dim)
    rq_t = pa.list_(pa.int32(), levels)
    cols = {
        "user_id": pa.array(users, pa.int64()), "item_id": pa.array(items, pa.int64()),
        "ts": pa.array(np.arange(n) * 1000, pa.timestamp("ms", tz="UTC")),
        "label": pa.array(label, pa.int8()), "part": pa.array(["test"] * n, pa.string()),
        "cold": pa.array(items >= n_items - 5), "new_user": pa.array(users >= n_users - 2),
        "sampled": pa.array(np.zeros(n, bool)),
        "hist_item_ids": pa.array([h.tolist() for h in hist_items], pa.list_(pa.int64())),
        "hist_rq": pa.array([item_rq[h].tolist() for h in hist_items], pa.list_(rq_t)),
        "rq": pa.array(item_rq[items].tolist(), rq_t),
        "vq": pa.array([v.tolist() for v in vq], pa.list_(pa.int32())),
        "hist_rq_raw": pa.array([item_rq[h][:, ::-1].tolist() for h in hist_items],
                                pa.list_(rq_t)),
        "rq_raw": pa.array(item_rq[items][:, ::-1].tolist(), rq_t),
        "vq_raw": pa.array([v.tolist() for v in vq], pa.list_(pa.int32())),
        "frozen": pa.array(frozen[items].tolist(), pa.list_(pa.float32())),
        # Predicted tags: the item's level-1 code (what the label depends on) and its parity.
        "pred_tags": pa.array([[int(c), codes + int(c) % 2] for c in item_rq[items, 0]],
                              pa.list_(pa.int32())),
    }
    return pa.table(cols, schema=examples_schema(levels))


def frozen_table(n_items: int = 50, frozen_dim: int = 4) -> np.ndarray:
    """The items' frozen content vectors (the same for every examples seed)."""
    return np.random.default_rng(1001).normal(size=(n_items, frozen_dim)).astype(np.float32)


def write_examples(folder: Path, table: pa.Table, files: int = 2,
                   row_group_size: int = 97) -> list[str]:
    """``files`` Parquet files of consecutive rows. The small default row groups make the
    readers cross row-group boundaries inside a batch (tests); benchmarks pass a large one, as
    Spark writes."""
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-table.num_rows // files)
    paths = []
    for i in range(files):
        path = folder / f"part-{i:05d}.parquet"
        pq.write_table(table.slice(i * per, per), path, row_group_size=row_group_size)
        paths.append(str(path))
    return paths
