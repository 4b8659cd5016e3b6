"""Point-in-time joins never return a value stamped after (or, by default, at) the event."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from feature_store.pit import point_in_time_join, point_in_time_join_spark
from feature_store.schemas import TS


def _random_case(seed: int, n_events=300, n_feats=200, n_keys=12):
    rng = np.random.default_rng(seed)
    events = pa.table({
        "user_id": pa.array(rng.integers(0, n_keys, n_events), pa.int64()),
        "ts": pa.array(rng.integers(0, 1000, n_events), pa.int64()).cast(TS),
        "eid": pa.array(np.arange(n_events), pa.int64()),
    })
    feats = pa.table({
        "user_id": pa.array(rng.integers(0, n_keys, n_feats), pa.int64()),
        "ts": pa.array(rng.permutation(1000)[:n_feats], pa.int64()).cast(TS),
        "value": pa.array(rng.standard_normal(n_feats), pa.float64()),
    })
    return events, feats


def _brute_force(events: pa.Table, feats: pa.Table, inclusive: bool):
    ev, ft = events.to_pandas(), feats.to_pandas()
    out = []
    for _, e in ev.iterrows():
        cand = ft[(ft.user_id == e.user_id) & ((ft.ts <= e.ts) if inclusive else (ft.ts < e.ts))]
        out.append(cand.sort_values("ts").value.iloc[-1] if len(cand) else np.nan)
    return np.array(out)


@pytest.mark.parametrize("inclusive", [False, True])
def test_arrow_join_matches_brute_force_and_never_leaks(inclusive):
    events, feats = _random_case(1)
    joined = point_in_time_join(events, feats, key="user_id", inclusive=inclusive).to_pandas()
    assert joined.eid.tolist() == list(range(events.num_rows))  # order and count kept
    np.testing.assert_allclose(joined.value.to_numpy(), _brute_force(events, feats, inclusive))
    seen = joined.dropna(subset=["ts_feature"])
    if inclusive:
        assert (seen.ts_feature <= seen.ts).all()
    else:
        assert (seen.ts_feature < seen.ts).all()


def test_value_stamped_at_event_time_is_not_visible_by_default():
    events = pa.table({"user_id": pa.array([1], pa.int64()),
                       "ts": pa.array([100], pa.int64()).cast(TS)})
    feats = pa.table({"user_id": pa.array([1, 1], pa.int64()),
                      "ts": pa.array([50, 100], pa.int64()).cast(TS),
                      "value": [5.0, 10.0]})
    assert point_in_time_join(events, feats, key="user_id")["value"].to_pylist() == [5.0]
    assert point_in_time_join(events, feats, key="user_id",
                              inclusive=True)["value"].to_pylist() == [10.0]


@pytest.mark.parametrize("inclusive", [False, True])
def test_spark_join_equals_arrow_join(spark, inclusive):
    events, feats = _random_case(2, n_events=150, n_feats=100)
    # A null feature value must stay null, not be filled from an older row.
    vals = feats["value"].to_pylist()
    vals[3] = None
    feats = feats.set_column(2, "value", pa.array(vals, pa.float64()))
    expected = point_in_time_join(events, feats, key="user_id", inclusive=inclusive).to_pandas()
    got = point_in_time_join_spark(spark.createDataFrame(events.to_pandas()),
                                   spark.createDataFrame(feats.to_pandas()), key="user_id",
                                   inclusive=inclusive).toPandas().sort_values("eid")
    np.testing.assert_allclose(got.value.to_numpy(dtype=float),
                               expected.value.to_numpy(dtype=float))
    seen = got.dropna(subset=["ts_feature"])
    assert ((seen.ts_feature <= seen.ts) if inclusive else (seen.ts_feature < seen.ts)).all()
