"""The pairs stage (Spark): behaviour pairs that alignment trains on.

All three miners read positive events (``label = 1``) of the training part of the split only
(``pipelines/split.py``) and never collect to the driver.

**Swing** (item-item). With ``U_i`` the users who clicked item i, ``I_u`` the items user u
clicked and the per-user weight ``w_u = 1 / sqrt(|I_u|)``::

    swing(i, j) = sum over unordered user pairs {u, v} in U_i ∩ U_j of
                  w_u * w_v / (alpha + |I_u ∩ I_v|)

Two users who share few items are strong evidence that i and j belong together; two heavy users
who share everything are weak evidence. Computed as: per item, the pairs of its users; per user
pair, their shared items; every item pair in that shared set receives the pair's contribution.

**ItemCF** (item-item): co-occurrence normalised by popularity (cosine),
``|U_i ∩ U_j| / sqrt(|U_i| * |U_j|)``.

Both are symmetric, keep pairs with ``support`` (co-clicking users for ItemCF, user pairs for
Swing) of at least ``min_support`` and the ``top_n`` best neighbours per item, optionally dividing
by ``popularity(dst) ** popularity_penalty``.

**U2I triggers**: for each positive target of a user, the most similar (cosine of raw item
embeddings) of that user's previous ``u2i_window`` positives, strictly earlier in time. A user
with one positive yields no pair.

Scaling: users' histories longer than ``max_user_items`` are sampled down to that many (seeded),
items with more than ``max_item_users`` users keep a seeded sample of them for the Swing user-pair
join (the quadratic part), and a user pair's shared items are capped at ``max_common_items``
before item pairs are exploded. These caps only bind on heavy users and popular items; they also
damp popular-item noise.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Optional

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from pipelines.config import PairsConfig

if TYPE_CHECKING:
    import pandas as pd


def positives(events: DataFrame, before=None) -> DataFrame:
    """Distinct (user_id, item_id, ts) positives (only those before ``before``, a timestamp
    literal, when given)."""
    pos = events.where(F.col("label") == 1)
    if before is not None:
        pos = pos.where(F.col("ts") < F.lit(before))
    return pos.select("user_id", "item_id", "ts")


def user_items(pos: DataFrame, cfg: PairsConfig) -> DataFrame:
    """Distinct (user_id, item_id), each user's history sampled down to ``max_user_items``."""
    ui = pos.select("user_id", "item_id").distinct()
    w = Window.partitionBy("user_id").orderBy(F.xxhash64("item_id", F.lit(cfg.seed)))
    return ui.withColumn("_r", F.row_number().over(w)).where(
        F.col("_r") <= cfg.max_user_items).drop("_r")


def _top_n(pairs: DataFrame, cfg: PairsConfig, source: str) -> DataFrame:
    w = Window.partitionBy("src").orderBy(F.col("score").desc(), F.col("dst"))
    return (pairs.where(F.col("support") >= cfg.min_support)
            .withColumn("_r", F.row_number().over(w)).where(F.col("_r") <= cfg.top_n)
            .select("src", "dst", F.col("score").cast("float").alias("score"),
                    F.lit(source).alias("source")))


def _penalise(pairs: DataFrame, ui: DataFrame, cfg: PairsConfig) -> DataFrame:
    if cfg.popularity_penalty <= 0:
        return pairs
    pop = ui.groupBy("item_id").agg(F.count("*").alias("_pop"))
    return (pairs.join(pop.withColumnRenamed("item_id", "dst"), "dst")
            .withColumn("score", F.col("score") / F.pow(F.col("_pop"), cfg.popularity_penalty))
            .drop("_pop"))


def swing_scores(ui: DataFrame, cfg: PairsConfig) -> DataFrame:
    """All Swing scores (src, dst, score, support) before top-N; symmetric.

    The quadratic step, each user pair's shared items, never becomes a row per (user pair, item):
    per item its (capped, sorted) users travel as one array, each user keeps the later part of it,
    and those rows are shuffled by user into :func:`_shared_items`, which counts the pairs with
    numpy inside the task. Only pairs sharing two or more items come out as rows.
    """
    weight = ui.groupBy("user_id").agg((1.0 / F.sqrt(F.count("*"))).alias("w"))
    w_item = Window.partitionBy("item_id").orderBy(F.xxhash64("user_id", F.lit(cfg.seed)))
    capped = ui.withColumn("_r", F.row_number().over(w_item)).where(
        F.col("_r") <= cfg.max_item_users).drop("_r")
    later = (capped.groupBy("item_id")
             .agg(F.array_sort(F.collect_list("user_id")).alias("users"))
             .select("item_id", "users", F.posexplode("users").alias("p", "u"))
             .where(F.size("users") > F.col("p") + 1)
             .select("item_id", "u", F.slice("users", F.col("p") + 2,
                                             F.size("users") - F.col("p") - 1).alias("later")))
    shared = later.repartition("u").mapInArrow(
        _shared_items(cfg.max_common_items),
        "u long, v long, n_common long, items array<long>")
    shared = (shared.join(weight.withColumnRenamed("user_id", "u").withColumnRenamed("w", "wu"),
                          "u")
              .join(weight.withColumnRenamed("user_id", "v").withColumnRenamed("w", "wv"), "v")
              .withColumn("c", F.col("wu") * F.col("wv") / (cfg.swing_alpha + F.col("n_common"))))
    pairs = (shared.select("c", F.explode("items").alias("src"), "items")
             .select("c", "src", F.explode("items").alias("dst"))
             .where(F.col("src") != F.col("dst")))
    return pairs.groupBy("src", "dst").agg(F.sum("c").alias("score"),
                                           F.count("*").alias("support"))


#: About how many (user, later user, item) triples :func:`_shared_items` expands and sorts at
#: once (a bucket of its partition's users).
SHARED_ITEMS_BLOCK = 1 << 22


def _shared_items(max_common: int, block: int = SHARED_ITEMS_BLOCK):
    """The task of :func:`swing_scores`' user-pair step (``mapInArrow``).

    Its rows (item_id, u, later), shuffled by u, say that u and every user in ``later`` share
    ``item_id``. Per pair (u, v) it writes the number of shared items and the first
    ``max_common`` of them in ascending order, for pairs sharing at least two. The task holds its
    partition's arrays once (8 bytes per user pair and shared item: more shuffle partitions,
    ``spark.sql.shuffle.partitions``, make each smaller) and expands and sorts them in buckets of
    users of about ``block`` triples each.
    """
    def task(batches):
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        batches = [b for b in batches if b.num_rows]
        if not batches:
            return
        t = pa.Table.from_batches(batches).combine_chunks()
        items = t.column("item_id").to_numpy()
        users = t.column("u").to_numpy()
        later = t.column("later").chunk(0)
        lengths = pc.list_value_length(later).to_numpy(zero_copy_only=False).astype(np.int64)
        values = pc.list_flatten(later).to_numpy()
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        n_buckets = max(1, -(-int(lengths.sum()) // block))
        bucket = users % n_buckets
        for k in range(n_buckets):
            rows = np.flatnonzero(bucket == k)
            if rows.size:
                out = _pairs_sharing_two(users[rows], items[rows], starts[rows], lengths[rows],
                                         values, max_common)
                if out is not None:
                    yield out
    return task


def _pairs_sharing_two(users, items, starts, lengths, values, max_common: int):
    """(u, v, n_common, items) of one bucket: see :func:`_shared_items`."""
    import numpy as np
    import pyarrow as pa

    total = int(lengths.sum())
    if total == 0:
        return None
    # Rows in (u, item) order, so the triples come out in (u, item) order and one stable sort
    # on (u, v) leaves each pair's items ascending. Each item's later users are ascending, so
    # that sort merges few long runs.
    rows = np.lexsort((items, users))
    users, items, starts, lengths = users[rows], items[rows], starts[rows], lengths[rows]
    u = np.repeat(users, lengths)
    i = np.repeat(items, lengths)
    v = values[_ranges(starts, lengths)]
    if users.min() >= 0 and v.min() >= 0 and max(users.max(), v.max()) < 1 << 31:
        order = np.argsort((u << 31) | v, kind="stable")
    else:
        order = np.lexsort((i, v, u))
    u, v, i = u[order], v[order], i[order]
    new = np.concatenate([[True], (u[1:] != u[:-1]) | (v[1:] != v[:-1])])
    first = np.flatnonzero(new)
    n = np.diff(np.append(first, total))
    keep = n >= 2
    first, n = first[keep], n[keep]
    if first.size == 0:
        return None
    take = np.minimum(n, max_common)
    pos = _ranges(first, take)
    offsets = np.concatenate([[0], np.cumsum(take)]).astype(np.int32)
    return pa.RecordBatch.from_arrays(
        [pa.array(u[first]), pa.array(v[first]), pa.array(n.astype(np.int64)),
         pa.ListArray.from_arrays(pa.array(offsets), pa.array(i[pos]))],
        names=["u", "v", "n_common", "items"])


def _ranges(starts, lengths):
    """The indices of the ranges [start, start + length), one after another."""
    import numpy as np

    return np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())


def mine_swing_pairs(ui: DataFrame, cfg: PairsConfig) -> DataFrame:
    return _top_n(_penalise(swing_scores(ui, cfg), ui, cfg), cfg, "swing")


def itemcf_scores(ui: DataFrame, cfg: PairsConfig) -> DataFrame:
    """Cosine co-occurrence (src, dst, score, support) before top-N; symmetric."""
    pop = ui.groupBy("item_id").agg(F.count("*").alias("pop"))
    a, b = ui.alias("a"), ui.alias("b")
    co = (a.join(b, (F.col("a.user_id") == F.col("b.user_id"))
                 & (F.col("a.item_id") != F.col("b.item_id")))
          .groupBy(F.col("a.item_id").alias("src"), F.col("b.item_id").alias("dst"))
          .agg(F.count("*").alias("support")))
    return (co.join(pop.withColumnRenamed("item_id", "src").withColumnRenamed("pop", "ps"), "src")
            .join(pop.withColumnRenamed("item_id", "dst").withColumnRenamed("pop", "pd"), "dst")
            .select("src", "dst", "support",
                    (F.col("support") / F.sqrt(F.col("ps") * F.col("pd"))).alias("score")))


def mine_itemcf_pairs(ui: DataFrame, cfg: PairsConfig) -> DataFrame:
    return _top_n(_penalise(itemcf_scores(ui, cfg), ui, cfg), cfg, "itemcf")


def _dot(a, b):
    return F.aggregate(F.zip_with(a, b, lambda x, y: x * y), F.lit(0.0).cast("double"),
                       lambda acc, x: acc + x)


def mine_u2i_pairs(pos: DataFrame, embeddings: DataFrame, cfg: PairsConfig) -> DataFrame:
    """(src = trigger, dst = target, score = cosine, source = u2i), one row per distinct pair
    (the best cosine over the users who produced it)."""
    w = Window.partitionBy("user_id").orderBy("ts", "item_id")
    ranked = pos.withColumn("r", F.row_number().over(w))
    t, g = ranked.alias("t"), ranked.alias("g")
    cand = t.join(g, (F.col("t.user_id") == F.col("g.user_id"))
                  & (F.col("g.r") < F.col("t.r")) & (F.col("g.r") >= F.col("t.r") - cfg.u2i_window)
                  & (F.col("g.ts") < F.col("t.ts")) & (F.col("g.item_id") != F.col("t.item_id")))
    cand = cand.select(F.col("t.user_id").alias("user_id"), F.col("t.r").alias("r"),
                       F.col("t.item_id").alias("dst"), F.col("g.item_id").alias("src"))
    e = embeddings.select("item_id", "embedding")
    cand = (cand.join(e.withColumnRenamed("item_id", "src").withColumnRenamed("embedding", "es"),
                      "src")
            .join(e.withColumnRenamed("item_id", "dst").withColumnRenamed("embedding", "ed"),
                  "dst")
            .withColumn("score", _dot(F.col("es"), F.col("ed"))))
    best = Window.partitionBy("user_id", "r").orderBy(F.col("score").desc(), F.col("src"))
    triggers = cand.withColumn("_b", F.row_number().over(best)).where(F.col("_b") == 1)
    return (triggers.groupBy("src", "dst").agg(F.max("score").cast("float").alias("score"))
            .select("src", "dst", "score", F.lit("u2i").alias("source")))


def recent(train_events: DataFrame, days: Optional[int]) -> DataFrame:
    """The training events of the last ``days`` days (up to the newest training event), or all
    of them when ``days`` is None (``pairs.window_days``)."""
    if days is None:
        return train_events
    if days < 1:
        raise ValueError(f"pairs.window_days must be >= 1, got {days}")
    newest = train_events.agg(F.max("ts").alias("t")).first()["t"]
    if newest is None:
        return train_events
    return train_events.where(F.col("ts") > F.lit(newest - dt.timedelta(days=days)))


def mine_pairs(train_events: DataFrame, embeddings: DataFrame, cfg: PairsConfig) -> DataFrame:
    """All configured pair sources, as ``item_pairs`` rows, from the training part's events."""
    pos = positives(train_events)
    ui = user_items(pos, cfg)
    parts = []
    for source in cfg.sources:
        if source == "swing":
            parts.append(mine_swing_pairs(ui, cfg))
        elif source == "itemcf":
            parts.append(mine_itemcf_pairs(ui, cfg))
        elif source == "u2i":
            parts.append(mine_u2i_pairs(pos, embeddings, cfg))
        else:
            raise ValueError(f"pairs.sources: unknown source {source!r}; use swing, itemcf, u2i")
    out = parts[0]
    for p in parts[1:]:
        out = out.unionByName(p)
    return out


def pair_summary(pairs: DataFrame) -> dict[str, tuple[int, float]]:
    """Pairs per source and their mean score: ``{source: (count, mean score)}``."""
    return {r["source"]: (int(r["n"]), float(r["mean"])) for r in
            pairs.groupBy("source").agg(F.count("*").alias("n"), F.avg("score").alias("mean"))
            .collect()}


def heldout_next_pairs(split: DataFrame, part: str = "test") -> DataFrame:
    """Held-out next clicks: for each positive of ``part`` (of ``split_events``), the user's
    previous positive in any part, as (src, dst, user_id): the pair is never in training."""
    pos = split.where(F.col("label") == 1)
    w = Window.partitionBy("user_id").orderBy("ts", "item_id")
    return (pos.withColumn("src", F.lag("item_id").over(w))
            .where((F.col("part") == part) & F.col("src").isNotNull()
                   & (F.col("src") != F.col("item_id")))
            .select("src", F.col("item_id").alias("dst"), "user_id"))


def heldout_pair_sets(split: DataFrame) -> dict[str, "pd.DataFrame"]:
    """Held-out behaviour of the test part, as pandas frames with columns src, dst: next clicks
    (:func:`heldout_next_pairs`), and Swing pairs mined on the test part alone."""
    cfg = PairsConfig(min_support=1)
    swing = swing_scores(user_items(positives(split.where(F.col("part") == "test")), cfg), cfg)
    return {"next-click": heldout_next_pairs(split).select("src", "dst").toPandas(),
            "held-out swing": swing.select("src", "dst").toPandas()}
