"""Point-in-time joins: for each event, the feature values as of the event time, never later.

A feature row stamped exactly at the event time is, by default, *not* visible to that event
(``inclusive=False``): in a log, a value written in the same millisecond as an impression was
usually caused by it. Pass ``inclusive=True`` when features are known to be written before events.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd
import pyarrow as pa


def point_in_time_join(events: pa.Table, features: pa.Table, *, key: str | Sequence[str],
                       event_ts: str = "ts", feature_ts: str = "ts",
                       inclusive: bool = False) -> pa.Table:
    """Left-join ``features`` onto ``events`` by ``key``, taking the latest feature row stamped
    before (or, with ``inclusive``, at) each event's time. Events without such a row get nulls.

    Both inputs are Arrow tables; the result has every event row (same order) plus the feature
    columns other than the key, with the feature timestamp renamed ``<feature_ts>_feature``.
    """
    keys = [key] if isinstance(key, str) else list(key)
    ev = events.to_pandas()
    ev["__row"] = range(len(ev))
    ft = features.to_pandas().rename(columns={feature_ts: f"{feature_ts}_feature"})
    fcol = f"{feature_ts}_feature"
    ev_sorted = ev.sort_values(event_ts, kind="stable")
    ft_sorted = ft.sort_values(fcol, kind="stable")
    # allow_exact_matches=False gives strictly-before semantics.
    joined = pd.merge_asof(ev_sorted, ft_sorted, left_on=event_ts, right_on=fcol, by=keys,
                           direction="backward", allow_exact_matches=inclusive)
    joined = joined.sort_values("__row").drop(columns="__row").reset_index(drop=True)
    return pa.Table.from_pandas(joined, preserve_index=False)


def point_in_time_join_spark(events, features, *, key: str | Sequence[str], event_ts: str = "ts",
                             feature_ts: str = "ts", inclusive: bool = False):
    """The same join on Spark DataFrames, without collecting either side.

    Union events and feature rows per key, order by time (feature rows first on a tie when
    ``inclusive``, last otherwise) and carry the last feature value forward with
    ``last(..., ignorenulls=True)`` over the window.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    keys = [key] if isinstance(key, str) else list(key)
    fcols = [c for c in features.columns if c not in keys and c != feature_ts]
    fcol = f"{feature_ts}_feature"
    ev_cols = events.columns
    ev = events.select(
        *[F.col(c) for c in ev_cols],
        *[F.lit(None).cast(features.schema[c].dataType).alias(f"__f_{c}") for c in fcols],
        F.lit(None).cast(features.schema[feature_ts].dataType).alias(f"__f_{fcol}"),
        F.col(event_ts).alias("__t"),
        F.lit(1 if inclusive else 0).alias("__order"),
        F.lit(True).alias("__is_event"),
    )
    ft = features.select(
        *[F.col(k).alias(k) if k in keys else F.lit(None).cast(events.schema[k].dataType).alias(k)
          for k in ev_cols],
        *[F.col(c).alias(f"__f_{c}") for c in fcols],
        F.col(feature_ts).alias(f"__f_{fcol}"),
        F.col(feature_ts).alias("__t"),
        F.lit(0 if inclusive else 1).alias("__order"),
        F.lit(False).alias("__is_event"),
    )
    w = (Window.partitionBy(*keys).orderBy("__t", "__order")
         .rowsBetween(Window.unboundedPreceding, Window.currentRow))
    # One feature row's columns must travel together: carry the feature timestamp and pick the
    # values of that same row (a null feature value must not be filled from an older row).
    both = ev.unionByName(ft)
    both = both.withColumn("__last_ft", F.last(f"__f_{fcol}", ignorenulls=True).over(w))
    w_row = (Window.partitionBy(*keys, "__last_ft").orderBy("__t", "__order")
             .rowsBetween(Window.unboundedPreceding, Window.currentRow))
    out = both
    for c in fcols:
        out = out.withColumn(c, F.first(F.when(~F.col("__is_event"), F.col(f"__f_{c}")),
                                         ignorenulls=True).over(w_row))
    out = out.where(F.col("__is_event")).withColumn(fcol, F.col("__last_ft"))
    return out.select(*ev_cols, *fcols, fcol)
