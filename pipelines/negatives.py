"""Negatives for implicit feedback, drawn without looking at the future.

For a positive of user u at time t, each sampled negative is an item that

* exists at t: created at or before t (or, without a creation time, first seen at or before t);
* is not one of u's positives up to t (u's positives after t stay eligible: banning them would
  tell the model which items the user is going to engage with).

Draws follow the sampling distribution ``neg_prob`` (training popularity, see
:mod:`pipelines.examples`) restricted to the eligible items. A few rounds of rejection sampling
serve almost every draw; a draw still missing after them is made exactly from the renormalised
eligible distribution (early in a log few items exist, and rejection alone could take long).
"""

from __future__ import annotations

import numpy as np

#: Time (epoch ms) of an item that has always existed (no creation time, never seen).
ALWAYS = np.iinfo(np.int64).min

_REJECTION_ROUNDS = 8


class NoEligibleNegative(ValueError):
    """At some positive's time no item could be a negative for that user."""


def sample_negatives(rng: np.random.Generator, pos_ts: np.ndarray, pos_items: np.ndarray,
                     ratio: int, exists_from: np.ndarray, neg_prob: np.ndarray) -> np.ndarray:
    """``ratio`` negatives per positive (in order: the first positive's, then the second's...).

    ``pos_ts`` (epoch ms, ascending) and ``pos_items`` are all of one user's positives;
    ``exists_from[i]`` is when item i exists from (epoch ms, :data:`ALWAYS` for always);
    ``neg_prob`` the sampling distribution over items (sums to 1)."""
    slot_t = np.repeat(np.asarray(pos_ts, np.int64), ratio)
    out = np.full(len(slot_t), -1, np.int64)
    if not len(slot_t):
        return out
    # The user's first positive time per item: an item is banned at t when that time <= t.
    items, first = np.unique(np.asarray(pos_items, np.int64), return_index=True)
    first_ts = np.asarray(pos_ts, np.int64)[first]

    def banned(cand: np.ndarray, t: np.ndarray) -> np.ndarray:
        k = np.minimum(np.searchsorted(items, cand), len(items) - 1)
        return (items[k] == cand) & (first_ts[k] <= t)

    need = np.arange(len(slot_t))
    for _ in range(_REJECTION_ROUNDS):
        if not len(need):
            return out
        cand = rng.choice(len(neg_prob), size=len(need), p=neg_prob)
        t = slot_t[need]
        ok = (exists_from[cand] <= t) & ~banned(cand, t)
        out[need[ok]] = cand[ok]
        need = need[~ok]
    everything = np.arange(len(neg_prob))
    for j in need:
        t = slot_t[j]
        p = neg_prob * ((exists_from <= t) & ~banned(everything, np.full(len(everything), t)))
        if p.sum() <= 0:
            raise NoEligibleNegative(f"no item can be a negative at ts {t}: every item that "
                                     "exists then is already one of the user's positives")
        out[j] = rng.choice(len(p), p=p / p.sum())
    return out
