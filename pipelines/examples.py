"""The examples stage (Spark): ranker training and evaluation examples from events and codes.

For every event (an impression with its label) the builder emits one example with

* the user's **history**: the last ``history_len`` positive items of the user whose event time
  is *strictly before* the example's ``ts`` (never the example's own event, never a later or
  simultaneous one), oldest first, with their RQ codes;
* the target item's RQ code per level and VQ code bag, from the aligned ``item_codes`` and, when
  the ``codes_raw`` arm is on, from ``item_codes_raw``;
* optionally the target's frozen content embedding (the cascade arm's dense input);
* ``cold``: the target item was created, or first seen, in the evaluation period.

Events before the split's ``train_end`` become ``train_examples``, the rest ``eval_examples``.
History in evaluation may use earlier evaluation-period positives, as a live system would.

**Implicit feedback** (every event is a positive, e.g. plays or purchases): each positive gets
``neg_ratio`` sampled negatives with the positive's time and history, drawn from item popularity
in the training period raised to ``neg_pop_power`` (plus one, so new items can be drawn) and never
an item the user has a positive on. Sampling is seeded by (seed, user), so the examples snapshot,
and with it every ablation arm, sees the same negatives. ``sampled`` marks them.

Items the quantizer never coded (quarantined at embed) get the reserved code ``-1`` on every
level, which the ranker maps to its own row; their VQ bag is empty and their frozen vector zero.

Work is grouped by user (``applyInPandas``): one user's events must fit in a worker's memory,
which holds for behaviour logs; per-item lookups (codes, cold flags, popularity) are broadcast
as numpy arrays indexed by the dense item id.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from pipelines.config import ExamplesConfig

MISSING_CODE = -1


class ExamplesError(ValueError):
    """The inputs cannot make examples (no events in a split, bad config)."""


@dataclass
class ItemLookups:
    """Per-item arrays indexed by the dense item id (broadcast to the workers)."""

    rq: np.ndarray                 # [n, L] int32, MISSING_CODE where uncoded
    vq_offsets: np.ndarray         # [n + 1] int64 into vq_values
    vq_values: np.ndarray          # int32
    rq_raw: np.ndarray | None
    vq_raw_offsets: np.ndarray | None
    vq_raw_values: np.ndarray | None
    cold: np.ndarray               # [n] bool
    neg_prob: np.ndarray           # [n] float64, sums to 1

    @property
    def levels(self) -> int:
        return self.rq.shape[1]


def _codes_arrays(codes: pd.DataFrame, n: int, levels: int):
    rq = np.full((n, levels), MISSING_CODE, np.int32)
    ids = codes.item_id.to_numpy()
    if len(ids):
        rq[ids] = np.stack(codes.rq.to_numpy()).astype(np.int32)
    lens = np.zeros(n, np.int64)
    lens[ids] = codes.vq.map(len).to_numpy()
    offsets = np.concatenate([[0], np.cumsum(lens)])
    values = np.zeros(offsets[-1], np.int32)
    for i, v in zip(ids, codes.vq.to_numpy()):
        values[offsets[i]:offsets[i + 1]] = v
    return rq, offsets, values


def item_lookups(items: DataFrame, events: DataFrame, codes: DataFrame,
                 codes_raw: DataFrame | None, end: dt.datetime,
                 cfg: ExamplesConfig) -> ItemLookups:
    """Collect the per-item arrays (sized by the item count, not the event count)."""
    n = int(items.agg(F.max("item_id")).first()[0]) + 1
    first = events.groupBy("item_id").agg(F.min("ts").alias("first_ts"))
    pop = (events.where((F.col("label") == 1) & (F.col("ts") < F.lit(end)))
           .groupBy("item_id").agg(F.count("*").alias("pop")))
    per_item = (items.select("item_id", "created_ts").join(first, "item_id", "left")
                .join(pop, "item_id", "left")
                .select("item_id",
                        ((F.col("created_ts") >= F.lit(end))
                         | (F.col("first_ts") >= F.lit(end))).alias("cold"),
                        F.coalesce("pop", F.lit(0)).alias("pop"))
                .toPandas())
    cold = np.zeros(n, bool)
    cold[per_item.item_id.to_numpy()] = per_item.cold.astype("boolean").fillna(False).to_numpy(bool)
    weight = np.zeros(n, np.float64)
    weight[per_item.item_id.to_numpy()] = (per_item["pop"].to_numpy(np.float64) + 1.0) \
        ** cfg.neg_pop_power
    c = codes.select("item_id", "rq", "vq").toPandas()
    levels = len(c.rq.iloc[0]) if len(c) else 1
    rq, vo, vv = _codes_arrays(c, n, levels)
    raw = (None, None, None)
    if codes_raw is not None:
        raw = _codes_arrays(codes_raw.select("item_id", "rq", "vq").toPandas(), n, levels)
    return ItemLookups(rq, vo, vv, *raw, cold=cold, neg_prob=weight / weight.sum())


def _bag(offsets, values, ids):
    return [values[offsets[i]:offsets[i + 1]].tolist() for i in ids]


def user_examples(pdf: pd.DataFrame, lk: ItemLookups, end_ms: int, cfg: ExamplesConfig,
                  sample_negatives: bool) -> pd.DataFrame:
    """All examples of one user (``pdf``: that user's events with ``ts`` in epoch ms)."""
    pdf = pdf.sort_values(["ts", "item_id"], kind="stable")
    user = int(pdf.user_id.iloc[0])
    ts = pdf.ts.to_numpy(np.int64)
    items = pdf.item_id.to_numpy(np.int64)
    labels = pdf.label.to_numpy(np.int8)
    pos = labels == 1
    pos_ts, pos_items = ts[pos], items[pos]
    sampled = np.zeros(len(ts), bool)
    if sample_negatives:
        rng = np.random.default_rng([cfg.seed, user])
        banned = set(pos_items.tolist())
        n_neg = cfg.neg_ratio * int(pos.sum())
        if len(banned) >= len(lk.neg_prob):
            raise ExamplesError(f"user {user} has a positive on every item: no negatives exist")
        draws: list[int] = []
        while len(draws) < n_neg:   # rejection: redraw the user's own positives
            cand = rng.choice(len(lk.neg_prob), size=2 * (n_neg - len(draws)) + 8,
                              p=lk.neg_prob)
            draws.extend(int(c) for c in cand if c not in banned)
        neg_items = np.asarray(draws[:n_neg], np.int64)
        neg_ts = np.repeat(pos_ts, cfg.neg_ratio)
        ts = np.concatenate([ts, neg_ts])
        items = np.concatenate([items, neg_items])
        labels = np.concatenate([labels, np.zeros(n_neg, np.int8)])
        sampled = np.concatenate([sampled, np.ones(n_neg, bool)])
    # Positives strictly before each example: pos_ts[:k] with k = first index with ts >= t.
    k = np.searchsorted(pos_ts, ts, side="left")
    lo = np.maximum(k - cfg.history_len, 0)
    hist = [pos_items[a:b] for a, b in zip(lo, k)]
    out = {
        "user_id": np.full(len(ts), user, np.int64), "item_id": items,
        "ts": ts, "label": labels, "cold": lk.cold[items], "sampled": sampled,
        "hist_item_ids": [h.tolist() for h in hist],
        "hist_rq": [lk.rq[h].tolist() for h in hist],
        "rq": lk.rq[items].tolist(),
        "vq": _bag(lk.vq_offsets, lk.vq_values, items),
        "split": np.where(ts < end_ms, "train", "eval"),
    }
    if lk.rq_raw is not None:
        out["hist_rq_raw"] = [lk.rq_raw[h].tolist() for h in hist]
        out["rq_raw"] = lk.rq_raw[items].tolist()
        out["vq_raw"] = _bag(lk.vq_raw_offsets, lk.vq_raw_values, items)
    else:
        out["hist_rq_raw"] = out["rq_raw"] = out["vq_raw"] = [None] * len(ts)
    return pd.DataFrame(out)


_UDF_SCHEMA = ("user_id long, item_id long, ts long, label byte, cold boolean, sampled boolean, "
               "hist_item_ids array<long>, hist_rq array<array<int>>, rq array<int>, "
               "vq array<int>, split string, hist_rq_raw array<array<int>>, rq_raw array<int>, "
               "vq_raw array<int>")


def wants_negatives(events: DataFrame, cfg: ExamplesConfig) -> bool:
    if cfg.negatives not in ("auto", "always", "never"):
        raise ExamplesError(f"examples.negatives must be auto, always or never, "
                            f"got {cfg.negatives!r}")
    if cfg.negatives != "auto":
        return cfg.negatives == "always"
    return events.where(F.col("label") == 0).limit(1).count() == 0


def build_examples(events: DataFrame, items: DataFrame, codes: DataFrame,
                   codes_raw: DataFrame | None, frozen: DataFrame | None, end: dt.datetime,
                   cfg: ExamplesConfig) -> tuple[DataFrame, DataFrame, dict]:
    """(train examples, eval examples, facts for the manifest). Rows are ordered by a seeded
    hash so that reading the Parquet files in name order is a fixed shuffle."""
    spark = events.sparkSession
    if cfg.history_len < 1 or cfg.neg_ratio < 1:
        raise ExamplesError("examples.history_len and examples.neg_ratio must be >= 1")
    sample = wants_negatives(events, cfg)
    lk = item_lookups(items, events, codes, codes_raw, end, cfg)
    bc = spark.sparkContext.broadcast(lk)
    end_ms = int(end.timestamp() * 1000)
    def per_user(pdf: pd.DataFrame) -> pd.DataFrame:
        return user_examples(pdf, bc.value, end_ms, cfg, sample)

    ev = events.select("user_id", "item_id", (F.unix_millis("ts")).alias("ts"), "label")
    ex = (ev.repartition(cfg.partitions, "user_id").groupBy("user_id")
          .applyInPandas(per_user, _UDF_SCHEMA)
          .withColumn("ts", F.timestamp_millis("ts")))
    if frozen is not None:
        ex = ex.join(frozen.select("item_id", F.col("embedding").alias("frozen")), "item_id",
                     "left")
    else:
        ex = ex.withColumn("frozen", F.lit(None).cast("array<float>"))
    ex = ex.withColumn("_order", F.xxhash64("user_id", "item_id", "ts", "sampled",
                                            F.lit(cfg.seed)))
    cols = ["user_id", "item_id", "ts", "label", "cold", "sampled", "hist_item_ids", "hist_rq",
            "rq", "vq", "hist_rq_raw", "rq_raw", "vq_raw", "frozen"]
    train = ex.where(F.col("split") == "train").orderBy("_order").select(*cols)
    evals = ex.where(F.col("split") == "eval").orderBy("_order").select(*cols)
    facts = {"implicit_negatives": sample, "levels": lk.levels,
             "n_items": int(lk.rq.shape[0]), "train_end": end.isoformat(),
             "history_len": cfg.history_len, "raw_codes": codes_raw is not None,
             "frozen": frozen is not None}
    return train, evals, facts


@dataclass
class ExampleStats:
    """Counts per split (``train``, ``eval``) and what the ranker's tables must hold."""

    splits: dict[str, dict]
    #: Rows per RQ level table: the largest code (aligned or raw) + 1.
    codes_per_level: int
    n_users: int
    mean_history: float
    mean_vq: float

    @property
    def observed(self) -> int:
        """Examples that are events (not sampled negatives)."""
        return sum(s["n"] - s["sampled"] for s in self.splits.values())

    @property
    def total(self) -> int:
        return sum(s["n"] for s in self.splits.values())


def example_stats(train: DataFrame, evals: DataFrame) -> ExampleStats:
    """Aggregate the examples of both splits; raises :class:`ExamplesError` for an empty one."""
    splits = {}
    for name, df in (("train", train), ("eval", evals)):
        r = df.agg(F.count("*").alias("n"), F.sum(F.col("sampled").cast("int")).alias("sampled"),
                   F.sum("label").alias("pos"), F.avg(F.size("hist_item_ids")).alias("hist"),
                   F.sum(F.col("cold").cast("int")).alias("cold"),
                   F.max(F.array_max("rq")).alias("max_rq"),
                   F.max(F.array_max("rq_raw")).alias("max_rq_raw"),
                   F.avg(F.size("vq")).alias("vq"), F.max("user_id").alias("max_user")).first()
        s = r.asDict()
        if not s["n"]:
            raise ExamplesError(f"no {name} examples: the split (train_end / train_share) leaves "
                                f"the {name} period empty")
        splits[name] = {"n": s["n"], "positives": int(s["pos"]), "sampled": int(s["sampled"] or 0),
                        "cold": int(s["cold"]), "mean_history": float(s["hist"] or 0.0),
                        "max_rq": s["max_rq"], "max_rq_raw": s["max_rq_raw"],
                        "mean_vq": float(s["vq"] or 0.0), "max_user": s["max_user"]}
    return ExampleStats(
        splits,
        codes_per_level=int(max(s[k] or 0 for s in splits.values()
                                for k in ("max_rq", "max_rq_raw"))) + 1,
        n_users=int(max(s["max_user"] for s in splits.values())) + 1,
        mean_history=splits["train"]["mean_history"], mean_vq=splits["train"]["mean_vq"])
