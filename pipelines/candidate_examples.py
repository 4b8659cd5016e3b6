"""Ranker examples for retrieved candidates (the two-stage system and ``qarm recommend``), built
exactly as the examples stage builds them (``pipelines.examples.user_examples``): the user's
positives before the first target as the history (their last ``examples.history_len``), each
candidate's RQ codes and VQ bag, at the time of the first target."""

from __future__ import annotations

import numpy as np
import pandas as pd


def candidate_examples(q, top: np.ndarray, times: dict, feats, cold: np.ndarray, ex_cfg,
                       pred_tags: pd.DataFrame | None = None, vocab: tuple[str, ...] = ()):
    """Examples rows (the examples schema, as Arrow) of every query's candidates.

    ``times``: user id -> (positive item ids, their epoch ms, in order; the first target's ms).
    ``pred_tags`` (item_id, pred_tags) fills the ``pred_tags`` column with the indices of the
    ranker's tag ``vocab``."""
    import pyarrow as pa

    from feature_store.schemas import examples_schema
    from pipelines.examples import ItemLookups, user_examples

    lk = ItemLookups(feats.rq, feats.vq_offsets, feats.vq_values, None, None, None, cold=cold,
                     exists_from=np.zeros(feats.n_items, np.int64),
                     neg_prob=np.full(feats.n_items, 1.0 / feats.n_items))
    if pred_tags is not None:
        from pipelines.examples import pred_tag_arrays

        _, lk.tag_offsets, lk.tag_values = pred_tag_arrays(pred_tags, feats.n_items, vocab)
    frames = []
    for u in range(len(q)):
        user = int(q.users[u])
        hist_items, hist_ms, t_ms = times[user]
        cand = top[u][top[u] >= 0]
        pdf = pd.DataFrame({
            "user_id": user,
            "item_id": np.concatenate([hist_items, cand]).astype(np.int64),
            "ts": np.concatenate([hist_ms, np.full(len(cand), t_ms)]).astype(np.int64),
            "label": np.concatenate([np.ones(len(hist_items)),
                                     np.isin(cand, q.targets(u))]).astype(np.int8),
            "part": ["train"] * len(hist_items) + ["test"] * len(cand)})
        ex = user_examples(pdf, lk, ex_cfg, negatives=False)
        frames.append(ex[ex.part == "test"].assign(query=u))
    df = pd.concat(frames, ignore_index=True)
    df["ts"] = pd.to_datetime(df.ts, unit="ms", utc=True).astype("datetime64[ms, UTC]")
    df["frozen"] = None
    query = df.pop("query").to_numpy()
    schema = examples_schema(feats.levels)
    table = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
    return table, query
