"""Examples with another codebook's codes, and the paired comparison of two scorers.

The promotion gate scores the champion and the challenger on the *same* evaluation examples,
each with its own codes: :func:`recode_examples` replaces the target's RQ codes and VQ bag and the
history's RQ codes by those of a given item → codes table (the examples' ids, labels, history
ids and flags stay). :func:`paired_difference` is the paired bootstrap over users of a metric's
difference (the ablation's resampling: both scorers see the same resampled users).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from recsys.ablation import percentile_interval, user_resamples, weighted_auc


class RecodeError(ValueError):
    """Examples refer to items the codes table does not cover."""


def recode_examples(rows: pa.Table, ids: np.ndarray, rq: np.ndarray, vq: np.ndarray
                    ) -> pa.Table:
    """``rows`` (the examples schema) with ``rq``/``hist_rq``/``vq`` from the codes of ``ids``
    (``rq``: (n, L) int; ``vq``: (n, K) int)."""
    ids = np.asarray(ids, np.int64)
    order = np.argsort(ids)
    sorted_ids = ids[order]

    def rows_of(item_ids: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(sorted_ids, item_ids)
        pos = np.clip(pos, 0, max(len(sorted_ids) - 1, 0))
        bad = (len(sorted_ids) == 0) | (sorted_ids[pos] != item_ids) if len(item_ids) else []
        if np.any(bad):
            missing = np.unique(np.asarray(item_ids)[np.asarray(bad)])[:5].tolist()
            raise RecodeError(f"{int(np.sum(bad))} examples refer to items without codes "
                              f"(e.g. {missing})")
        return order[pos]

    L = rq.shape[1]
    rq_type = pa.list_(pa.int32(), L)
    target = rows_of(rows.column("item_id").to_numpy())
    hist = rows.column("hist_item_ids").combine_chunks()
    hist_rows = rows_of(hist.values.to_numpy())
    rq32 = rq.astype(np.int32)
    rq_col = pa.FixedSizeListArray.from_arrays(pa.array(rq32[target].reshape(-1)), L)
    hist_flat = pa.FixedSizeListArray.from_arrays(pa.array(rq32[hist_rows].reshape(-1)), L)
    hist_col = pa.ListArray.from_arrays(hist.offsets, hist_flat, type=pa.list_(rq_type))
    vq_np = vq.astype(np.int32)[target]
    vq_col = pa.ListArray.from_arrays(
        pa.array(np.arange(0, vq_np.size + 1, vq_np.shape[1] or 1, dtype=np.int32)
                 if vq_np.shape[1] else np.zeros(len(target) + 1, np.int32)),
        pa.array(vq_np.reshape(-1)))
    out = rows
    for name, col in (("rq", rq_col), ("hist_rq", hist_col), ("vq", vq_col)):
        i = out.schema.get_field_index(name)
        out = out.set_column(i, pa.field(name, col.type, nullable=False), col)
    return out


def paired_difference(users: np.ndarray, labels: np.ndarray, a: np.ndarray, b: np.ndarray,
                      B: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """AUC(a) − AUC(b) on the same examples with its paired bootstrap interval over users."""
    users = np.asarray(users)
    uniq, counts = user_resamples(users, B, seed)
    idx = np.searchsorted(uniq, users)
    diff = weighted_auc(labels, a) - weighted_auc(labels, b)
    diffs = np.array([weighted_auc(labels, a, c[idx]) - weighted_auc(labels, b, c[idx])
                      for c in counts])
    lo, hi = percentile_interval(diffs, level) if B else (math.nan, math.nan)
    return {"diff": float(diff), "lo": lo, "hi": hi, "users": int(len(uniq)),
            "examples": int(len(users)), "bootstrap": B, "level": level}
