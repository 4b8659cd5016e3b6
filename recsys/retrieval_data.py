"""What the retriever learns from and is judged on, from the split events' positives.

* **training sequences**: each user's training positives in order (time, then item id), cut into
  windows of ``max_len + 1`` from the end (consecutive windows share one item, so every position
  is a target once);
* **validation queries**: history = the training positives, targets = the validation positives;
* **test queries**: history = the training and validation positives, targets = the test ones;
* **serving histories**: every positive of every user (what a live system knows today).

Only users with at least one earlier positive are queried (a user tower needs a history; a new
user is served by the fallbacks). Implicit data and explicit data alike: only ``label == 1``
events count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from recsys.retrieval_metrics import Queries


@dataclass
class RetrievalData:
    n_items: int
    sequences: list[np.ndarray]
    valid: Queries
    test: Queries
    serving_users: np.ndarray
    serving_histories: list[np.ndarray]
    #: Training positives per item.
    popularity: np.ndarray
    #: Items with no training event (any label): the cold items.
    cold: np.ndarray
    #: Per test query's user: (earlier positives, their epoch ms, the first target's epoch ms),
    #: what the ranker's examples for its candidates are built from.
    test_times: dict = None

    def save_sequences(self, path) -> str:
        off = np.concatenate([[0], np.cumsum([len(s) for s in self.sequences])]).astype(np.int64)
        items = (np.concatenate(self.sequences) if self.sequences else np.zeros(0)).astype(
            np.int64)
        np.savez(path, offsets=off, items=items)
        return str(path)


def windows(seq: np.ndarray, size: int) -> list[np.ndarray]:
    """``seq`` cut into windows of ``size`` from the end, consecutive windows sharing one item;
    a sequence shorter than 2 has no (input, target) pair and gives none."""
    out, end = [], len(seq)
    while end >= 2:
        out.append(seq[max(0, end - size):end])
        end = end - size + 1
    return out[::-1]


def retrieval_data(events: pd.DataFrame, n_items: int, max_len: int) -> RetrievalData:
    """``events``: user_id, item_id, ts, label, part (the split events)."""
    ev = events.sort_values(["user_id", "ts", "item_id"], kind="stable")
    in_train = np.zeros(n_items, bool)
    in_train[ev.item_id[ev.part == "train"].to_numpy()] = True
    pos = ev[ev.label == 1]
    popularity = np.bincount(pos.item_id[pos.part == "train"].to_numpy(), minlength=n_items)
    seqs, vu, vh, vt, tu, th, tt, su, sh = [], [], [], [], [], [], [], [], []
    times = {}
    ms_all = pos.ts.astype("datetime64[ms, UTC]" if getattr(pos.ts.dt, "tz", None) else
                           "datetime64[ms]").astype("int64").to_numpy()
    pos = pos.assign(_ms=ms_all)
    for user, g in pos.groupby("user_id", sort=True):
        items, part = g.item_id.to_numpy(np.int64), g.part.to_numpy()
        ms = g._ms.to_numpy()
        tr, va, te = items[part == "train"], items[part == "valid"], items[part == "test"]
        seqs += windows(tr, max_len + 1)
        if len(tr) and len(va):
            vu.append(user), vh.append(tr), vt.append(va)
        before = np.concatenate([tr, va])
        if len(before) and len(te):
            tu.append(user), th.append(before), tt.append(te)
            times[int(user)] = (before, ms[part != "test"], int(ms[part == "test"].min()))
        su.append(user), sh.append(items)
    return RetrievalData(n_items, seqs, Queries.build(vu, vh, vt), Queries.build(tu, th, tt),
                         np.asarray(su, np.int64), sh, popularity, ~in_train, times)
