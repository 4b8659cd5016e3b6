"""The examples stage (Spark): ranker examples from the split events and the item codes.

For every event (an impression with its label) of ``split_events`` the builder emits one example
with

* the user's **history**: the last ``history_len`` positive items of the user whose event time
  is *strictly before* the example's ``ts`` (never the example's own event, never a later or
  simultaneous one), oldest first, with their RQ codes;
* the target item's RQ code per level and VQ code bag, from the aligned ``item_codes`` and, when
  the ``codes_raw`` arm is on, from ``item_codes_raw``;
* optionally the target's frozen content embedding (the cascade arm's dense input);
* optionally the target's **predicted tags** (``pred_tags``: the ``pretrain`` stage's tagger
  output as indices into a vocabulary, a bag feature the ranker can read);
* ``part`` (the event's part of the split), ``cold`` (the target item has no event in the
  training part) and ``new_user`` (the user has none).

Training-part events become ``train_examples``, validation ``valid_examples``, test
``eval_examples``. History of a validation or test example may use that user's earlier
validation or test positives, as a live system would; no training example can see them (they
come later in the user's sequence).

**Implicit feedback** (every event is a positive, e.g. plays or purchases): each positive gets
``neg_ratio`` sampled negatives with the positive's time, part and history, drawn from item
popularity in the training part raised to ``neg_pop_power`` (plus one, so new items can be
drawn), restricted to items that exist at that time and are not the user's positives up to that
time (:mod:`pipelines.negatives`). Sampling is seeded by (seed, user), so the examples snapshot,
and with it every ablation arm, sees the same negatives. ``sampled`` marks them.

Items the quantizer never coded (quarantined at embed) get the reserved code ``-1`` on every
level, which the ranker maps to its own row; their VQ bag is empty and their frozen vector zero.

Work is grouped by user (``applyInPandas``): one user's events must fit in a worker's memory,
which holds for behaviour logs; per-item lookups (codes, cold flags, popularity, existence) are
broadcast as numpy arrays indexed by the dense item id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from pipelines.accounting import UnusableData
from pipelines.config import ExamplesConfig
from pipelines.negatives import ALWAYS, NoEligibleNegative, sample_negatives

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
    cold: np.ndarray               # [n] bool: no event in the training part
    exists_from: np.ndarray        # [n] int64 epoch ms: created (or first seen); ALWAYS if neither
    neg_prob: np.ndarray           # [n] float64, sums to 1
    #: Predicted tag bags ([n + 1] offsets into int32 tag indices); None: no ``pred_tags``.
    tag_offsets: np.ndarray | None = None
    tag_values: np.ndarray | None = None

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


def item_lookups(items: DataFrame, split: DataFrame, codes: DataFrame,
                 codes_raw: DataFrame | None, cfg: ExamplesConfig) -> ItemLookups:
    """Collect the per-item arrays (sized by the item count, not the event count)."""
    n = int(items.agg(F.max("item_id")).first()[0]) + 1
    train = F.col("part") == "train"
    per_event = split.groupBy("item_id").agg(
        F.min(F.unix_millis("ts")).alias("first_ms"),
        F.max(train.cast("int")).alias("in_train"),
        F.sum((train & (F.col("label") == 1)).cast("long")).alias("pop"))
    per_item = (items.select("item_id", F.unix_millis("created_ts").alias("created_ms"))
                .join(per_event, "item_id", "left").toPandas())
    ids = per_item.item_id.to_numpy()
    cold = np.zeros(n, bool)
    cold[ids] = per_item.in_train.fillna(0).to_numpy() == 0
    exists_from = np.full(n, ALWAYS, np.int64)
    created = per_item.created_ms.to_numpy(np.float64)
    known = np.where(np.isnan(created), per_item.first_ms.to_numpy(np.float64), created)
    exists_from[ids] = np.where(np.isnan(known), ALWAYS, known).astype(np.int64)
    weight = np.zeros(n, np.float64)
    weight[ids] = (per_item["pop"].fillna(0).to_numpy(np.float64) + 1.0) ** cfg.neg_pop_power
    c = codes.select("item_id", "rq", "vq").toPandas()
    levels = len(c.rq.iloc[0]) if len(c) else 1
    rq, vo, vv = _codes_arrays(c, n, levels)
    raw = (None, None, None)
    if codes_raw is not None:
        raw = _codes_arrays(codes_raw.select("item_id", "rq", "vq").toPandas(), n, levels)
    return ItemLookups(rq, vo, vv, *raw, cold=cold, exists_from=exists_from,
                       neg_prob=weight / weight.sum())


def pred_tag_arrays(pred: pd.DataFrame, n: int, vocab: tuple[str, ...] | None = None
                    ) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """(vocabulary, offsets, values) of the items' predicted tags (``pred``: item_id,
    pred_tags), indexed by the dense item id. The vocabulary is the sorted distinct tags (the
    same snapshot always gives the same indices) unless ``vocab`` is given (a trained ranker's:
    tags outside it are left out); items without a row get an empty bag."""
    pred = pred[pred.item_id < n]
    if vocab is None:
        vocab = tuple(sorted({t for tags in pred.pred_tags for t in tags}))
    index = {t: i for i, t in enumerate(vocab)}
    known = pred.pred_tags.map(lambda tags: [t for t in tags if t in index])
    lens = np.zeros(n, np.int64)
    ids = pred.item_id.to_numpy(np.int64)
    lens[ids] = known.map(len).to_numpy()
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    values = np.zeros(int(offsets[-1]), np.int32)
    for i, tags in zip(ids, known.to_numpy()):
        values[offsets[i]:offsets[i + 1]] = [index[t] for t in tags]
    return vocab, offsets, values


def _bag(offsets, values, ids):
    return [values[offsets[i]:offsets[i + 1]].tolist() for i in ids]


def user_examples(pdf: pd.DataFrame, lk: ItemLookups, cfg: ExamplesConfig,
                  negatives: bool) -> pd.DataFrame:
    """All examples of one user (``pdf``: that user's split events with ``ts`` in epoch ms)."""
    pdf = pdf.sort_values(["ts", "item_id"], kind="stable")
    user = int(pdf.user_id.iloc[0])
    ts = pdf.ts.to_numpy(np.int64)
    items = pdf.item_id.to_numpy(np.int64)
    labels = pdf.label.to_numpy(np.int8)
    parts = pdf.part.to_numpy(object)
    pos = labels == 1
    pos_ts, pos_items = ts[pos], items[pos]
    sampled = np.zeros(len(ts), bool)
    if negatives and pos.any():
        rng = np.random.default_rng([cfg.seed, user])
        try:
            neg_items = sample_negatives(rng, pos_ts, pos_items, cfg.neg_ratio,
                                         lk.exists_from, lk.neg_prob)
        except NoEligibleNegative as e:
            raise ExamplesError(f"user {user}: {e}") from None
        n_neg = len(neg_items)
        ts = np.concatenate([ts, np.repeat(pos_ts, cfg.neg_ratio)])
        items = np.concatenate([items, neg_items])
        labels = np.concatenate([labels, np.zeros(n_neg, np.int8)])
        parts = np.concatenate([parts, np.repeat(parts[pos], cfg.neg_ratio)])
        sampled = np.concatenate([sampled, np.ones(n_neg, bool)])
    # Positives strictly before each example: pos_ts[:k] with k = first index with ts >= t.
    k = np.searchsorted(pos_ts, ts, side="left")
    lo = np.maximum(k - cfg.history_len, 0)
    hist = [pos_items[a:b] for a, b in zip(lo, k)]
    out = {
        "user_id": np.full(len(ts), user, np.int64), "item_id": items,
        "ts": ts, "label": labels, "part": parts, "cold": lk.cold[items],
        "new_user": np.full(len(ts), not (parts == "train").any()), "sampled": sampled,
        "hist_item_ids": [h.tolist() for h in hist],
        "hist_rq": [lk.rq[h].tolist() for h in hist],
        "rq": lk.rq[items].tolist(),
        "vq": _bag(lk.vq_offsets, lk.vq_values, items),
    }
    if lk.rq_raw is not None:
        out["hist_rq_raw"] = [lk.rq_raw[h].tolist() for h in hist]
        out["rq_raw"] = lk.rq_raw[items].tolist()
        out["vq_raw"] = _bag(lk.vq_raw_offsets, lk.vq_raw_values, items)
    else:
        out["hist_rq_raw"] = out["rq_raw"] = out["vq_raw"] = [None] * len(ts)
    out["pred_tags"] = (_bag(lk.tag_offsets, lk.tag_values, items)
                        if lk.tag_offsets is not None else [None] * len(ts))
    return pd.DataFrame(out)


_UDF_SCHEMA = ("user_id long, item_id long, ts long, label byte, part string, cold boolean, "
               "new_user boolean, sampled boolean, hist_item_ids array<long>, "
               "hist_rq array<array<int>>, rq array<int>, vq array<int>, "
               "hist_rq_raw array<array<int>>, rq_raw array<int>, vq_raw array<int>, "
               "pred_tags array<int>")

#: Which examples table each part of the split goes to.
PART_TABLES = {"train": "train_examples", "valid": "valid_examples", "test": "eval_examples"}


def wants_negatives(split: DataFrame, cfg: ExamplesConfig) -> bool:
    """Whether to sample negatives: ``always`` / ``never``, or (``auto``) when no event is a
    negative (implicit feedback). Raises :class:`UnusableData` when the training part then has
    one label class only."""
    train = split.where(F.col("part") == "train")
    has_neg = train.where(F.col("label") == 0).limit(1).count() > 0
    has_pos = train.where(F.col("label") == 1).limit(1).count() > 0
    if not has_pos:
        raise UnusableData("the training part has no positive event: a ranker has nothing to "
                           "learn; check the labels (source.rating_threshold) and the split")
    sample = cfg.negatives == "always" or (
        cfg.negatives == "auto" and split.where(F.col("label") == 0).limit(1).count() == 0)
    if not sample and not has_neg:
        raise UnusableData("the training part has only positive events and examples.negatives "
                           "is never: a ranker cannot learn from one class; set "
                           "examples.negatives to auto or always (sampled negatives)")
    return sample


def build_examples(split: DataFrame, items: DataFrame, codes: DataFrame,
                   codes_raw: DataFrame | None, frozen: DataFrame | None,
                   cfg: ExamplesConfig, pred_tags: pd.DataFrame | None = None
                   ) -> tuple[DataFrame, dict[str, DataFrame], dict]:
    """(all examples, persisted: unpersist when written; the examples table of each part of
    the split; facts for the manifest). Each table's rows are bucketed and ordered by a seeded
    hash, so reading its Parquet files in name order is a fixed shuffle, the same in any Spark
    session. ``pred_tags`` (item_id,
    pred_tags: the tagger's output) fills the ``pred_tags`` column."""
    from pyspark import StorageLevel

    spark = split.sparkSession
    if cfg.history_len < 1 or cfg.neg_ratio < 1:
        raise ExamplesError("examples.history_len and examples.neg_ratio must be >= 1")
    sample = wants_negatives(split, cfg)
    lk = item_lookups(items, split, codes, codes_raw, cfg)
    vocab: tuple[str, ...] = ()
    if pred_tags is not None:
        vocab, lk.tag_offsets, lk.tag_values = pred_tag_arrays(pred_tags, lk.rq.shape[0])
    bc = spark.sparkContext.broadcast(lk)

    def per_user(pdf: pd.DataFrame) -> pd.DataFrame:
        return user_examples(pdf, bc.value, cfg, sample)

    ev = split.select("user_id", "item_id", (F.unix_millis("ts")).alias("ts"), "label", "part")
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
    cols = ["user_id", "item_id", "ts", "label", "part", "cold", "new_user", "sampled",
            "hist_item_ids", "hist_rq", "rq", "vq", "hist_rq_raw", "rq_raw", "vq_raw", "frozen",
            "pred_tags"]
    ex = ex.select(*cols, "_order").persist(StorageLevel.MEMORY_AND_DISK)
    # Hash buckets of the seeded order, each sorted: the same files whatever the Spark
    # session ran before (a global orderBy samples its range bounds with the shuffle's id,
    # so a rerun in a fresh process split the rows differently and trained in another order).
    out = {table: ex.where(F.col("part") == part)
           .repartition(cfg.partitions, F.pmod(F.col("_order"), F.lit(cfg.partitions)))
           .sortWithinPartitions("_order").select(*cols)
           for part, table in PART_TABLES.items()}
    facts = {"implicit_negatives": sample, "levels": lk.levels,
             "n_items": int(lk.rq.shape[0]), "history_len": cfg.history_len,
             "raw_codes": codes_raw is not None, "frozen": frozen is not None,
             "pred_tag_vocab": vocab}
    return ex, out, facts


@dataclass
class ExampleStats:
    """Counts per part (``train``, ``valid``, ``test``) and what the ranker's tables must hold."""

    parts: dict[str, dict]
    #: Rows per RQ level table: the largest code (aligned or raw) + 1.
    codes_per_level: int
    n_users: int
    mean_history: float
    mean_vq: float
    mean_pred_tags: float = 0.0

    @property
    def observed(self) -> int:
        """Examples that are events (not sampled negatives)."""
        return sum(s["n"] - s["sampled"] for s in self.parts.values())

    @property
    def total(self) -> int:
        return sum(s["n"] for s in self.parts.values())


def example_stats(examples: DataFrame) -> ExampleStats:
    """Aggregate the examples per part; raises :class:`ExamplesError` when the training or the
    test part has none."""
    rows = {r["part"]: r.asDict() for r in examples.groupBy("part").agg(
        F.count("*").alias("n"), F.sum(F.col("sampled").cast("int")).alias("sampled"),
        F.sum("label").alias("pos"), F.avg(F.size("hist_item_ids")).alias("hist"),
        F.sum(F.col("cold").cast("int")).alias("cold"),
        F.sum(F.col("new_user").cast("int")).alias("new_user"),
        F.max(F.array_max("rq")).alias("max_rq"), F.max(F.array_max("rq_raw")).alias("max_rq_raw"),
        F.avg(F.size("vq")).alias("vq"), F.avg(F.size("pred_tags")).alias("tags"),
        F.max("user_id").alias("max_user")).collect()}
    for part in ("train", "test"):
        if part not in rows:
            raise ExamplesError(f"no {part} examples: the split leaves the {part} part empty")
    parts = {}
    for part in PART_TABLES:
        s = rows.get(part, {})
        parts[part] = {"n": int(s.get("n") or 0), "positives": int(s.get("pos") or 0),
                       "sampled": int(s.get("sampled") or 0), "cold": int(s.get("cold") or 0),
                       "new_user": int(s.get("new_user") or 0),
                       "mean_history": float(s.get("hist") or 0.0),
                       "max_rq": s.get("max_rq"), "max_rq_raw": s.get("max_rq_raw"),
                       "mean_vq": float(s.get("vq") or 0.0), "max_user": s.get("max_user"),
                       "mean_pred_tags": max(float(s.get("tags") or 0.0), 0.0)}
    return ExampleStats(
        parts,
        codes_per_level=int(max(s[k] or 0 for s in parts.values()
                                for k in ("max_rq", "max_rq_raw"))) + 1,
        n_users=int(max(s["max_user"] or 0 for s in parts.values())) + 1,
        mean_history=parts["train"]["mean_history"], mean_vq=parts["train"]["mean_vq"],
        mean_pred_tags=parts["train"]["mean_pred_tags"])
