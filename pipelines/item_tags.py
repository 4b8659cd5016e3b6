"""Dated item attributes (MovieLens user tags) without future information.

A tag is behaviour: somebody wrote it at some time. It may describe an item only when it is
dated before the split point of whoever wrote it (``pipelines/split.py``):

* ``global_time``: before the validation part starts (before the test part when there is no
  validation slice), for every author alike;
* ``per_user``: before the author's own first validation or test event; an author with none (a
  training-only user, or one without events) is not bounded; a tag with no known author must be
  dated before the earliest validation or test event of anybody.

So no tag written after a user's evaluation began, and in particular no tag a user wrote on the
very item they are evaluated on after that point, reaches the item's text or tags.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from feature_store.facts import SplitFacts

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

#: Most tags an item keeps (alphabetical among those allowed), as the MovieLens adapter did.
MAX_TAGS = 20


def allowed_tags(item_tags: "DataFrame", split: "DataFrame", facts: SplitFacts) -> "DataFrame":
    """The (item_id, tag) pairs of ``item_tags`` dated before their author's split point."""
    from pyspark.sql import functions as F

    if facts.mode in ("global_time", "last_days"):
        cutoff = dt.datetime.fromisoformat(facts.valid_start or facts.test_start)
        return item_tags.where(F.col("ts") < F.lit(cutoff)).select("item_id", "tag")
    per_user = (split.where(F.col("part") != "train").groupBy("user_id")
                .agg(F.min("ts").alias("_cutoff")))
    earliest = per_user.agg(F.min("_cutoff").alias("_earliest"))
    keep = (item_tags.join(per_user, "user_id", "left").crossJoin(F.broadcast(earliest))
            .where(F.when(F.col("user_id").isNull(), F.col("ts") < F.col("_earliest"))
                   .when(F.col("_cutoff").isNull(), F.lit(True))
                   .otherwise(F.col("ts") < F.col("_cutoff"))))
    return keep.select("item_id", "tag")


def with_allowed_tags(items: "DataFrame", allowed: "DataFrame") -> "DataFrame":
    """``items`` with the allowed tags appended to ``tags`` (distinct, sorted, at most
    :data:`MAX_TAGS` per item; an item's own tags, such as genres, come first)."""
    from pyspark.sql import functions as F

    per_item = (allowed.groupBy("item_id")
                .agg(F.slice(F.array_sort(F.collect_set("tag")), 1, MAX_TAGS).alias("_dated")))
    merged = F.concat(F.coalesce("tags", F.array().cast("array<string>")),
                      F.coalesce("_dated", F.array().cast("array<string>")))
    return (items.join(per_item, "item_id", "left")
            .withColumn("tags", merged).drop("_dated").select(*items.columns))
