"""The examples builder on a real local Spark session: history strictly before each event, the
time split, cold flags, codes, and sampled negatives for implicit feedback."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from pipelines.examples import ExamplesConfig, ExamplesError, build_examples

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
END = T0 + dt.timedelta(hours=10)


def _ts(h):
    return T0 + dt.timedelta(hours=h)


@pytest.fixture(scope="module")
def tables(spark):
    items = pd.DataFrame({"item_id": range(12),
                          "created_ts": [_ts(0)] * 10 + [_ts(11), _ts(0)]})
    rows = []
    # user 0: positives at hours 1, 2, 2 (two at the same time), 3, 12; negatives in between.
    for h, i, y in [(1, 0, 1), (1.5, 5, 0), (2, 1, 1), (2, 2, 1), (3, 3, 1), (3, 6, 0),
                    (12, 4, 1), (12.5, 10, 0), (13, 11, 1)]:
        rows.append((0, i, _ts(h), y))
    # user 1: one positive, then a negative on the cold item.
    rows += [(1, 7, _ts(4), 1), (1, 10, _ts(14), 0)]
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "label"])
    codes = pd.DataFrame({"item_id": range(11),   # item 11 was never coded
                          "rq": [[i % 3, i % 2] for i in range(11)],
                          "vq": [[(i + 1) % 11, (i + 2) % 11] for i in range(11)]})
    frozen = pd.DataFrame({"item_id": range(12), "embedding": [[float(i)] * 2 for i in range(12)]})
    return (spark.createDataFrame(items), spark.createDataFrame(events),
            spark.createDataFrame(codes), spark.createDataFrame(frozen), events)


def _collect(df):
    out = df.toPandas()
    if out.ts.dt.tz is None:   # the session runs in UTC
        out["ts"] = out.ts.dt.tz_localize("UTC")
    return out.sort_values(["user_id", "ts", "item_id", "sampled"]).reset_index(drop=True)


def test_history_is_strictly_before_each_example_and_split_by_time(tables):
    items, events, codes, frozen, raw = tables
    cfg = ExamplesConfig(history_len=2, partitions=2)
    train, evals, facts = build_examples(events, items, codes, None, frozen, END, cfg)
    tr, ev = _collect(train), _collect(evals)
    assert len(tr) + len(ev) == len(raw) and not facts["implicit_negatives"]
    assert (tr.ts < END).all() and (ev.ts >= END).all()
    pos = raw[raw.label == 1]
    for df in (tr, ev):
        for r in df.itertuples():
            earlier = pos[(pos.user_id == r.user_id) & (pos.ts < r.ts)].sort_values(
                ["ts", "item_id"])
            assert list(r.hist_item_ids) == earlier.item_id.tolist()[-2:]
    u0 = tr[tr.user_id == 0]
    # Two positives at hour 2 do not see each other; the example at hour 3 sees both.
    assert [list(h) for h in u0[u0.ts == _ts(2)].hist_item_ids] == [[0], [0]]
    assert list(u0[u0.item_id == 3].hist_item_ids.iloc[0]) == [1, 2]
    assert list(u0[u0.item_id == 3].hist_rq.iloc[0][0]) == [1, 1]
    assert list(tr.iloc[0].rq) == [0, 0] and list(tr.iloc[0].vq) == [1, 2]
    assert list(tr.iloc[0].frozen) == [0.0, 0.0]


def test_cold_items_and_uncoded_items(tables):
    items, events, codes, frozen, _ = tables
    _, evals, _ = build_examples(events, items, codes, None, frozen, END,
                                 ExamplesConfig(partitions=2))
    ev = _collect(evals).set_index("item_id")
    # item 10 is created after the cut-off, item 4 first seen after it, item 11 neither.
    assert ev.loc[10].cold.all() and ev.loc[4].cold and ev.loc[11].cold
    assert list(ev.loc[11].rq) == [-1, -1] and list(ev.loc[11].vq) == []
    items2 = items.withColumn("created_ts", items.created_ts.cast("timestamp"))
    _, evals2, _ = build_examples(events, items2, codes, None, None, END,
                                  ExamplesConfig(partitions=2))
    assert _collect(evals2).frozen.isna().all()


def test_implicit_feedback_gets_seeded_popularity_negatives_never_a_positive(tables, spark):
    items, events, codes, frozen, raw = tables
    implicit = events.where("label = 1")
    cfg = ExamplesConfig(neg_ratio=3, partitions=2, seed=5)
    train, evals, facts = build_examples(implicit, items, codes, codes, None, END, cfg)
    assert facts["implicit_negatives"]
    tr, ev = _collect(train), _collect(evals)
    both = pd.concat([tr, ev])
    n_pos = int((raw.label == 1).sum())
    assert (~both.sampled).sum() == n_pos and both.sampled.sum() == 3 * n_pos
    assert (both[both.sampled].label == 0).all()
    pos = raw[raw.label == 1].groupby("user_id").item_id.agg(set)
    for r in both[both.sampled].itertuples():
        assert r.item_id not in pos[r.user_id]
        twin = both[(~both.sampled) & (both.user_id == r.user_id) & (both.ts == r.ts)]
        assert list(r.hist_item_ids) == list(twin.hist_item_ids.iloc[0])
    again = pd.concat([_collect(d) for d in build_examples(implicit, items, codes, codes, None,
                                                           END, cfg)[:2]])
    assert again.item_id.tolist() == both.item_id.tolist()
    assert list(both.iloc[0].rq_raw) == list(both.iloc[0].rq)
    with pytest.raises(ExamplesError, match="negatives"):
        build_examples(implicit, items, codes, None, None, END,
                       ExamplesConfig(negatives="sometimes"))
