"""The training / evaluation split shared by pairs, alignment and the ranker's examples.

A global time split: events before ``train_end`` are training, the rest evaluation. ``train_end``
is ``split.train_end`` when set, otherwise the point ``split.train_share`` of the way through the
events' time range.
"""

from __future__ import annotations

import datetime as dt

from pipelines.config import SplitConfig


class SplitError(ValueError):
    """The events cannot be split (no events, or no time range to split)."""


def train_end(cfg: SplitConfig, events_df) -> dt.datetime:
    """The training / evaluation boundary (a UTC datetime) for the ``events`` DataFrame."""
    from pyspark.sql import functions as F

    if cfg.train_end:
        t = dt.datetime.fromisoformat(cfg.train_end.replace("Z", "+00:00"))
        return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)
    row = events_df.agg(F.min("ts").alias("lo"), F.max("ts").alias("hi")).first()
    lo, hi = row["lo"], row["hi"]
    if lo is None:
        raise SplitError("the events table is empty: nothing to split into training and "
                         "evaluation; check the ingest report (every event quarantined?)")
    lo = lo if lo.tzinfo else lo.replace(tzinfo=dt.timezone.utc)
    hi = hi if hi.tzinfo else hi.replace(tzinfo=dt.timezone.utc)
    return lo + (hi - lo) * cfg.train_share
