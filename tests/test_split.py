"""The split on literal events: global time cut with a validation slice, per-user last positives,
and the typed error for data the protocol cannot use."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from pipelines.accounting import UnusableData
from pipelines.config import SplitConfig
from pipelines.split import auto_split, split_events, split_facts

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _events(spark, rows):
    return spark.createDataFrame(
        [(u, i, T0 + dt.timedelta(hours=h), y) for u, i, h, y in rows],
        "user_id long, item_id long, ts timestamp, label byte")


def _parts(df) -> dict:
    return {(r["user_id"], r["item_id"]): r["part"] for r in df.collect()}


def test_global_time_split_has_a_validation_slice_before_the_test_part(spark):
    ev = _events(spark, [(1, i, h, 1) for i, h in enumerate(range(0, 101, 10))])
    split, bounds = split_events(ev, SplitConfig(mode="global_time", train_share=0.8,
                                                 valid_share=0.25))
    parts = _parts(split)
    # Test from 80 h; validation is the last quarter of [0, 80): from 60 h.
    assert [parts[(1, i)] for i in range(11)] == ["train"] * 6 + ["valid"] * 2 + ["test"] * 3
    assert bounds["test_start"].startswith("2026-01-04T08:00") and \
        bounds["valid_start"].startswith("2026-01-03T12:00")
    facts = split_facts(split, SplitConfig(mode="global_time", train_share=0.8,
                                           valid_share=0.25), bounds)
    assert facts.rows == {"train": 6, "valid": 2, "test": 3}
    assert facts.test_users_known == 1 and facts.test_users_new == 0


def test_per_user_split_takes_each_users_last_positives(spark):
    rows = [
        # user 1: positives a..e, negatives in between; the last positive (e) and the negative
        # after it are test; d and the negative before e are validation.
        (1, 10, 1, 1), (1, 11, 2, 1), (1, 90, 3, 0), (1, 12, 4, 1), (1, 13, 5, 1),
        (1, 91, 6, 0), (1, 14, 7, 1), (1, 92, 8, 0),
        # user 2: exactly 3 positives (1 train, 1 validation, 1 test), two of them at one time:
        # the item id orders them.
        (2, 20, 1, 1), (2, 22, 5, 1), (2, 21, 5, 1),
        # user 3: 2 positives are too few: all training.
        (3, 30, 1, 1), (3, 31, 2, 1),
    ]
    cfg = SplitConfig(mode="per_user")
    split, bounds = split_events(_events(spark, rows), cfg)
    p = _parts(split)
    assert [p[(1, i)] for i in (10, 11, 90, 12)] == ["train"] * 4
    assert [p[(1, i)] for i in (13, 91)] == ["valid"] * 2
    assert [p[(1, i)] for i in (14, 92)] == ["test"] * 2
    assert (p[(2, 20)], p[(2, 21)], p[(2, 22)]) == ("train", "valid", "test")
    assert p[(3, 30)] == p[(3, 31)] == "train"
    facts = split_facts(split, cfg, bounds)
    assert facts.users == {"train": 3, "valid": 2, "test": 2} and facts.users_too_short == 1
    # Validation and test never overlap, and come after every training event of the user.
    df = split.toPandas()
    for _, g in df.groupby("user_id"):
        order = g.sort_values(["ts", "item_id"]).part.tolist()
        assert order == sorted(order, key=["train", "valid", "test"].index)


def test_per_user_test_last_n_and_valid_last_n(spark):
    rows = [(1, i, i, 1) for i in range(6)]
    split, _ = split_events(_events(spark, rows),
                            SplitConfig(mode="per_user", test_last_n=2, valid_last_n=0))
    assert [_parts(split)[(1, i)] for i in range(6)] == ["train"] * 4 + ["test"] * 2


GLOBAL = SplitConfig(mode="global_time")


@pytest.mark.parametrize("cfg, rows, message", [
    (GLOBAL, [], "events table is empty"),
    (GLOBAL, [(1, 1, 0, 0), (1, 2, 5, 0)], "none of the 2 events is a positive"),
    # All events at one time: nothing before the test part.
    (GLOBAL, [(1, 1, 0, 1), (2, 2, 0, 0)], "leaves the train part empty"),
    (SplitConfig(mode="global_time", train_end=(T0 + dt.timedelta(hours=99)).isoformat()),
     [(1, 1, 0, 1), (2, 2, 5, 0)], "leaves the test part empty"),
    (SplitConfig(mode="global_time", valid_share=0.01),
     [(1, 1, 0, 1), (1, 2, 50, 1), (1, 3, 100, 1)], "leaves the validation part empty"),
    # auto: neither split can be used; the error names both.
    (SplitConfig(), [], "events table is empty"),
    (SplitConfig(), [(1, 1, 0, 0), (1, 2, 5, 0)], "none of the 2 events is a positive"),
    (SplitConfig(), [(1, 1, 0, 1), (2, 2, 0, 0)],
     "leaves the train part empty.*also tried per_user: .*needs users with at least 3"),
    (SplitConfig(mode="per_user"), [(1, 1, 0, 1), (1, 2, 1, 1), (2, 3, 0, 1)],
     "needs users with at least 3 positives"),
])
def test_data_the_split_cannot_use_is_a_typed_error(spark, cfg, rows, message):
    ev = (_events(spark, rows) if rows else
          spark.createDataFrame([], "user_id long, item_id long, ts timestamp, label byte"))
    with pytest.raises(UnusableData, match=message):
        if cfg.mode == "auto":
            auto_split(ev, cfg)
        else:
            split, bounds = split_events(ev, cfg)
            split_facts(split, cfg, bounds)


def test_split_facts_count_known_and_new_test_users(spark):
    rows = [(1, 1, 0, 1), (1, 2, 100, 1), (2, 3, 100, 1), (2, 4, 50, 1), (3, 5, 100, 0)]
    cfg = SplitConfig(mode="global_time", train_share=0.7, valid_share=0.4)  # test 70 h, valid 42 h
    split, bounds = split_events(_events(spark, rows), cfg)
    facts = split_facts(split, cfg, bounds)
    assert facts.rows == {"train": 1, "valid": 1, "test": 3}
    # Users 1 has training events; users 2 (validation only before) and 3 are new in the test.
    assert (facts.test_users_known, facts.test_users_new) == (1, 2)
    assert pd.Series(facts.users).sum() == 5


def test_auto_keeps_the_global_cut_when_its_test_users_are_known(spark):
    # Two users active over the whole period: every test event has a known user.
    rows = [(u, 100 * u + i, h, 1) for u in (1, 2) for i, h in enumerate(range(0, 101, 5))]
    split, bounds, facts = auto_split(_events(spark, rows), SplitConfig())
    assert facts.mode == "global_time" and facts.auto.startswith("global_time"), facts.auto
    assert "(100.0%)" in facts.auto and bounds["test_start"] is not None
    assert split.count() == len(rows) and facts.rows["test"] == 10


def test_auto_splits_per_user_when_the_global_cut_tests_new_users(spark):
    # Users 1 and 2 are active early, users 3 and 4 only in the last hours: the global cut's
    # test part holds only new users, whose embeddings nothing would train.
    rows = ([(u, 10 * u + i, h, 1) for u in (1, 2) for i, h in enumerate((0, 20, 40, 74))]
            + [(u, 10 * u + i, 94 + 3 * i, 1) for u in (3, 4) for i in range(3)]
            + [(1, 19, 76, 0)])
    split, bounds, facts = auto_split(_events(spark, rows), SplitConfig())
    assert facts.mode == "per_user" and bounds["test_start"] is None
    assert facts.auto.startswith("per_user") and "0 of its 6 test events (0.0%)" in facts.auto
    p = _parts(split)
    assert [p[(1, 10 + i)] for i in range(4)] == ["train", "train", "valid", "test"]
    assert p[(1, 19)] == "test"                          # after the user's last positive
    assert [p[(3, 30 + i)] for i in range(3)] == ["train", "valid", "test"]
    # Nothing lost: every event is in exactly one part.
    assert split.count() == len(rows) == sum(facts.rows.values())
    # A lower bar keeps the global cut.
    _, _, facts = auto_split(_events(spark, rows), SplitConfig(auto_min_known=0.0))
    assert facts.mode == "global_time"


def test_auto_falls_back_on_what_can_be_used(spark):
    # Every event at one time: the global cut has no training part; per_user orders the
    # user's events by item id.
    rows = [(1, i, 0, 1) for i in range(4)]
    split, _, facts = auto_split(_events(spark, rows), SplitConfig())
    assert facts.mode == "per_user" and "cannot be used" in facts.auto
    assert [_parts(split)[(1, i)] for i in range(4)] == ["train", "train", "valid", "test"]
    # The global cut tests only a new user, but no user has the 3 positives per_user needs:
    # the global cut is kept, and the facts say why.
    rows = [(1, 1, 0, 1), (1, 2, 10, 0), (2, 3, 100, 1)]
    split, _, facts = auto_split(_events(spark, rows), SplitConfig(valid_share=0.0))
    assert facts.mode == "global_time" and "per_user cannot be used" in facts.auto
    assert split.count() == 3
