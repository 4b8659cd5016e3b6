"""Swing, ItemCF and U2I triggers on literal event tables, checked against hand-computed values."""

from __future__ import annotations

import datetime as dt
import math

import pytest
from pyspark.sql import functions as F

from pipelines.pairs import (PairsConfig, itemcf_scores, mine_pairs, mine_u2i_pairs, positives,
                             swing_scores, user_items, heldout_next_pairs)

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
END = dt.datetime(2026, 2, 1, tzinfo=dt.timezone.utc)
A, B, C, D = 1, 2, 3, 4


def _events(spark, rows):
    return spark.createDataFrame(
        [(u, i, T0 + dt.timedelta(minutes=m), lab) for u, i, m, lab in rows],
        "user_id long, item_id long, ts timestamp, label byte")


@pytest.fixture
def literal(spark):
    # u1 clicks A, B, C; u2 clicks A, B; u3 clicks B, C; u4 saw D but did not click;
    # a click after the training end must be ignored.
    return _events(spark, [(1, A, 0, 1), (1, B, 1, 1), (1, C, 2, 1), (2, A, 0, 1), (2, B, 5, 1),
                           (3, B, 0, 1), (3, C, 3, 1), (4, D, 0, 0),
                           (2, C, 60 * 24 * 40, 1)])


def _as_dict(df):
    return {(r["src"], r["dst"]): (r["score"], r["support"]) for r in df.collect()}


def test_swing_equals_hand_computed_values(literal):
    cfg = PairsConfig(swing_alpha=1.0, min_support=1)
    got = _as_dict(swing_scores(user_items(positives(literal, END), cfg), cfg))
    # (A, B): users u1 (3 items) and u2 (2 items) share {A, B}: w1 w2 / (alpha + 2)
    ab = (1 / math.sqrt(3)) * (1 / math.sqrt(2)) / (1 + 2)
    # (B, C): users u1 and u3 (2 items) share {B, C}
    bc = (1 / math.sqrt(3)) * (1 / math.sqrt(2)) / (1 + 2)
    assert set(got) == {(A, B), (B, A), (B, C), (C, B)}  # (A, C) has one common user only
    assert got[(A, B)][0] == pytest.approx(ab) and got[(B, C)][0] == pytest.approx(bc)
    assert got[(A, B)] == got[(B, A)]  # symmetric


def test_itemcf_equals_hand_computed_values(literal):
    cfg = PairsConfig(min_support=1)
    got = _as_dict(itemcf_scores(user_items(positives(literal, END), cfg), cfg))
    # popularity A=2, B=3, C=2 (the late click and the non-click do not count)
    assert got[(A, B)] == (pytest.approx(2 / math.sqrt(6)), 2)
    assert got[(B, C)] == (pytest.approx(2 / math.sqrt(6)), 2)
    assert got[(A, C)] == (pytest.approx(1 / math.sqrt(4)), 1)
    assert all(got[(s, d)] == got[(d, s)] for s, d in got)
    assert D not in {k for pair in got for k in pair}


def test_min_support_and_top_n(literal):
    cfg = PairsConfig(sources=["itemcf"], min_support=2, top_n=1)
    rows = mine_pairs(literal.where(F.col('ts') < F.lit(END)), None, cfg).collect()
    assert {(r["src"], r["dst"]) for r in rows} <= {(A, B), (B, A), (B, C), (C, B)}
    assert len([r for r in rows if r["src"] == B]) == 1


def test_u2i_trigger_is_the_most_similar_earlier_positive(spark):
    ev = _events(spark, [(1, A, 0, 1), (1, B, 1, 1), (1, C, 2, 1), (1, D, 3, 1),
                         (2, A, 0, 1),                      # one event: no pair
                         (3, B, 5, 1), (3, C, 5, 1)])       # same time: neither is earlier
    emb = spark.createDataFrame([(A, [1.0, 0.0]), (B, [0.0, 1.0]), (C, [0.8, 0.6]),
                                 (D, [0.0, 1.0])], "item_id long, embedding array<float>")
    got = {(r["src"], r["dst"]): r["score"] for r in
           mine_u2i_pairs(positives(ev, END), emb, PairsConfig()).collect()}
    # B's only earlier positive is A; C is nearer to A (0.8) than to B (0.6); D's best is B (1.0).
    assert set(got) == {(A, B), (A, C), (B, D)}
    assert got[(A, C)] == pytest.approx(0.8) and got[(B, D)] == pytest.approx(1.0)
    # Never a future trigger: no pair ends at A (the first event) or starts at D (the last).
    assert all(dst != A for _, dst in got) and all(src != D for src, _ in got)


def test_u2i_window_limits_how_far_back(spark):
    ev = _events(spark, [(1, A, 0, 1), (1, B, 1, 1), (1, C, 2, 1)])
    emb = spark.createDataFrame([(A, [1.0, 0.0]), (B, [0.0, 1.0]), (C, [1.0, 0.0])],
                                "item_id long, embedding array<float>")
    got = {(r["src"], r["dst"]) for r in
           mine_u2i_pairs(positives(ev, END), emb, PairsConfig(u2i_window=1)).collect()}
    assert got == {(A, B), (B, C)}  # C cannot reach back to A with a window of 1


def test_heldout_next_pairs_end_in_the_test_part_and_start_anywhere_before(spark):
    parts = {(1, C): "test", (1, B): "valid", (2, B): "test", (3, C): "test"}
    ev = _events(spark, [(1, A, 0, 1), (1, B, 1, 1), (1, D, 2, 0), (1, C, 3, 1),
                         (2, A, 0, 1), (2, B, 5, 1),
                         (3, C, 3, 1)])                        # no earlier positive: no pair
    split = ev.withColumn("part", F.udf(lambda u, i: parts.get((u, i), "train"))(
        "user_id", "item_id"))
    got = {(r["user_id"], r["src"], r["dst"]) for r in heldout_next_pairs(split).collect()}
    # u1's test click C follows its validation click B (the negative D is not a click).
    assert got == {(1, B, C), (2, A, B)}


def _swing_by_hand(clicks, alpha, max_common):
    """Swing from its definition, pair by pair (no caps on histories or item users)."""
    items_of = {}
    for u, i in clicks:
        items_of.setdefault(u, set()).add(i)
    out = {}
    for u in items_of:
        for v in items_of:
            common = sorted(items_of[u] & items_of[v])
            if u >= v or len(common) < 2:
                continue
            c = (len(items_of[u]) * len(items_of[v])) ** -0.5 / (alpha + len(common))
            for a in common[:max_common]:
                for b in common[:max_common]:
                    if a != b:
                        s, n = out.get((a, b), (0.0, 0))
                        out[(a, b)] = (s + c, n + 1)
    return out


def test_swing_equals_its_definition_on_a_random_world_with_the_common_items_capped(spark):
    import numpy as np

    rng = np.random.default_rng(3)
    # 40 users over 12 items, some heavy: many pairs share 3+ items, so the cap of 3 binds.
    clicks = {(int(u), int(rng.integers(0, 12) if u % 3 else rng.integers(0, 5)))
              for u in rng.integers(0, 40, 400)}
    ev = _events(spark, [(u, i, 0, 1) for u, i in sorted(clicks)])
    cfg = PairsConfig(swing_alpha=0.5, min_support=1, max_common_items=3)
    got = _as_dict(swing_scores(user_items(positives(ev, END), cfg), cfg))
    want = _swing_by_hand(clicks, 0.5, 3)
    assert set(got) == set(want) and len(want) > 40
    for k, (score, support) in want.items():
        assert got[k][0] == pytest.approx(score, rel=1e-9) and got[k][1] == support


@pytest.mark.parametrize("offset", [0, 1 << 40])   # user ids past 2^31 take the lexsort path
def test_the_user_pair_task_gives_the_same_rows_in_any_number_of_memory_buckets(offset):
    import numpy as np
    import pyarrow as pa

    from pipelines.pairs import _shared_items

    rng = np.random.default_rng(0)
    rows = []
    for item in range(30):
        users = np.sort(rng.choice(50, size=int(rng.integers(2, 20)), replace=False))
        users = users + offset
        rows += [(item, int(u), users[k + 1:].tolist()) for k, u in enumerate(users[:-1])]
    batch = pa.RecordBatch.from_pylist(
        [{"item_id": i, "u": u, "later": later} for i, u, later in rows],
        schema=pa.schema([("item_id", pa.int64()), ("u", pa.int64()),
                          ("later", pa.list_(pa.int64()))]))

    def run(block):
        out = [b.to_pylist() for b in _shared_items(4, block=block)(iter([batch[:70], batch[70:]]))]
        return sorted((r["u"], r["v"], r["n_common"], tuple(r["items"]))
                      for part in out for r in part), len(out)

    one, n_one = run(1 << 30)
    many, n_many = run(40)
    assert n_one == 1 and n_many > 5
    assert one == many and len(one) > 100
    assert all(n >= 2 and list(items) == sorted(items) and len(items) == min(n, 4)
               and offset <= u < v for u, v, n, items in one)
    # Each pair's count is the number of items both users are in; its items the smallest 4.
    shared = {}
    for item, u, later in rows:
        for v in later:
            shared.setdefault((u, v), []).append(item)
    assert {(u, v): (n, items) for u, v, n, items in one} == {
        k: (len(x), tuple(sorted(x)[:4])) for k, x in shared.items() if len(x) >= 2}
