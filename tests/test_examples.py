"""The examples builder on a real local Spark session: history strictly before each event, the
parts of the split, cold and new-user flags, codes, and sampled negatives for implicit feedback
that never look at the future."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from pipelines.accounting import UnusableData
from pipelines.config import SplitConfig
from pipelines.examples import ExamplesConfig, build_examples
from pipelines.negatives import ALWAYS, sample_negatives
from pipelines.split import split_events

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
END = T0 + dt.timedelta(hours=10)
#: The test part starts at END; the validation part is the last 20% before it (from 8.2 h).
SPLIT = SplitConfig(mode="global_time", train_end=END.isoformat(), valid_share=0.2)


def _ts(h):
    return T0 + dt.timedelta(hours=h)


@pytest.fixture(scope="module")
def tables(spark):
    items = pd.DataFrame({"item_id": range(12),
                          "created_ts": [_ts(0)] * 10 + [_ts(11), _ts(0)]})
    rows = []
    # user 0: positives at hours 1, 2, 2 (two at the same time), 3, 9 (validation), 12 (test);
    # negatives in between.
    for h, i, y in [(1, 0, 1), (1.5, 5, 0), (2, 1, 1), (2, 2, 1), (3, 3, 1), (3, 6, 0),
                    (9, 8, 1), (12, 4, 1), (12.5, 10, 0), (13, 11, 1)]:
        rows.append((0, i, _ts(h), y))
    # user 1: one positive, then a negative on the cold item; user 2 only appears in the test.
    rows += [(1, 7, _ts(4), 1), (1, 10, _ts(14), 0), (2, 9, _ts(11), 1), (2, 3, _ts(11.5), 0)]
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "label"])
    codes = pd.DataFrame({"item_id": range(11),   # item 11 was never coded
                          "rq": [[i % 3, i % 2] for i in range(11)],
                          "vq": [[(i + 1) % 11, (i + 2) % 11] for i in range(11)]})
    frozen = pd.DataFrame({"item_id": range(12), "embedding": [[float(i)] * 2 for i in range(12)]})
    split, _ = split_events(spark.createDataFrame(events), SPLIT)
    return (spark.createDataFrame(items), split, spark.createDataFrame(codes),
            spark.createDataFrame(frozen), events)


def _collect(df):
    out = df.toPandas()
    if out.ts.dt.tz is None:   # the session runs in UTC
        out["ts"] = out.ts.dt.tz_localize("UTC")
    return out.sort_values(["user_id", "ts", "item_id", "sampled"]).reset_index(drop=True)


def _build(split, items, codes, codes_raw, frozen, cfg):
    every, tables, facts = build_examples(split, items, codes, codes_raw, frozen, cfg)
    out = {t: _collect(df) for t, df in tables.items()}
    every.unpersist()
    return out, facts


def test_history_is_strictly_before_each_example_and_parts_follow_the_split(tables):
    items, split, codes, frozen, raw = tables
    out, facts = _build(split, items, codes, None, frozen,
                        ExamplesConfig(history_len=2, partitions=2))
    tr, va, te = out["train_examples"], out["valid_examples"], out["eval_examples"]
    assert len(tr) + len(va) + len(te) == len(raw) and not facts["implicit_negatives"]
    valid_start = END - (END - _ts(1)) * 0.2
    assert (tr.ts < valid_start).all() and (tr.part == "train").all()
    assert va.ts.between(valid_start, END, inclusive="left").all() and (va.part == "valid").all()
    assert (te.ts >= END).all() and (te.part == "test").all()
    pos = raw[raw.label == 1]
    for df in (tr, va, te):
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
    # A test example's history may hold the user's validation positive (item 8).
    assert 8 in list(te[(te.user_id == 0) & (te.item_id == 4)].hist_item_ids.iloc[0])
    # User 2 has no training event: new; users 0 and 1 are known.
    assert te[te.user_id == 2].new_user.all() and not te[te.user_id < 2].new_user.any()


def test_cold_items_have_no_training_event_and_uncoded_items_get_the_reserved_code(tables):
    items, split, codes, frozen, _ = tables
    out, _ = _build(split, items, codes, None, frozen, ExamplesConfig(partitions=2))
    te = out["eval_examples"].set_index("item_id")
    # item 10 is created after the cut, items 4 and 9 first seen after it, item 11 neither; item
    # 3 was trained on (user 0 at hour 3), so user 2's negative on it is not cold.
    assert te.loc[10].cold.all() and te.loc[4].cold and te.loc[9].cold and te.loc[11].cold
    assert not te.loc[3].cold
    assert out["valid_examples"].cold.all()          # item 8: first seen in validation
    assert list(te.loc[11].rq) == [-1, -1] and list(te.loc[11].vq) == []
    out2, _ = _build(split, items, codes, None, None, ExamplesConfig(partitions=2))
    assert out2["eval_examples"].frozen.isna().all()


def test_implicit_negatives_exist_at_the_event_and_are_not_earlier_positives(tables):
    items, split, codes, _, raw = tables
    implicit = split.where("label = 1")
    cfg = ExamplesConfig(neg_ratio=3, partitions=2, seed=5)
    out, facts = _build(implicit, items, codes, codes, None, cfg)
    assert facts["implicit_negatives"]
    every = pd.concat(out.values())
    n_pos = int((raw.label == 1).sum())
    assert (~every.sampled).sum() == n_pos and every.sampled.sum() == 3 * n_pos
    assert (every[every.sampled].label == 0).all()
    created = dict(zip(range(12), [_ts(0)] * 10 + [_ts(11), _ts(0)]))
    pos = raw[raw.label == 1]
    for r in every[every.sampled].itertuples():
        earlier = set(pos[(pos.user_id == r.user_id) & (pos.ts <= r.ts)].item_id)
        assert r.item_id not in earlier and created[r.item_id] <= r.ts
        twin = every[(~every.sampled) & (every.user_id == r.user_id) & (every.ts == r.ts)]
        assert list(r.hist_item_ids) == list(twin.hist_item_ids.iloc[0])
        assert r.part == twin.part.iloc[0]
    again, _ = _build(implicit, items, codes, codes, None, cfg)
    assert pd.concat(again.values()).item_id.tolist() == every.item_id.tolist()
    assert list(every.iloc[0].rq_raw) == list(every.iloc[0].rq)


def test_negative_sampler_never_reads_the_future():
    """A later positive of the user may be drawn (banning it would leak what the user will
    click); an earlier positive and an item not yet created may not."""
    pos_ts, pos_items = np.array([10, 20]), np.array([0, 1])
    exists_from = np.array([ALWAYS, ALWAYS, 15, ALWAYS])      # item 2 exists from t = 15
    prob = np.full(4, 0.25)
    draws = sample_negatives(np.random.default_rng(0), pos_ts, pos_items, 400, exists_from, prob)
    at_10, at_20 = draws[:400], draws[400:]
    assert set(at_10) == {1, 3}          # 1 is a *later* positive: allowed; 0 and 2 are not
    assert set(at_20) == {2, 3}          # both positives are in the past now; 2 exists
    # When rejection keeps failing, the exact draw still respects the rule.
    scarce = np.array([ALWAYS, 100, 100, 100])
    got = sample_negatives(np.random.default_rng(1), np.array([50]), np.array([1]), 5, scarce,
                           np.array([0.001, 0.333, 0.333, 0.333]))
    assert set(got) == {0}


def test_one_label_class_in_training_is_unusable(tables, spark):
    items, split, codes, _, _ = tables
    positives_only = split.where("label = 1")
    with pytest.raises(UnusableData, match="only positive events and examples.negatives is never"):
        build_examples(positives_only, items, codes, None, None,
                       ExamplesConfig(negatives="never"))
    with pytest.raises(UnusableData, match="training part has no positive event"):
        build_examples(split.where("label = 0 or part != 'train'"), items, codes, None, None,
                       ExamplesConfig())
