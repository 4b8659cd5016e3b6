"""The split: every event goes to the ``train``, ``valid`` or ``test`` part (``split_events``).

Every stage that learns from behaviour (pair mining, alignment, the ranker's training examples,
popularity for negative sampling) reads only the ``train`` part; ``valid`` and ``test`` events are
scored, never learned from. The modes (``split.mode``):

``global_time``
    One cut for everyone. The test part starts at ``split.train_end``, or ``train_share`` of the
    way through the events' time range; the validation part is the last ``valid_share`` of the
    period before it. Items and users that first appear later are cold / new.
``last_days``
    The daily job's protocol: the test part is the last ``test_days`` whole days (UTC) of the
    events (the day the run is for), the validation part the ``valid_days`` days before them,
    training everything earlier. Each new day moves every cut by one day: yesterday's validation
    day becomes training, yesterday's test day validation.
``per_user``
    For data whose timestamps only order each user's sequence (the sequential-recommendation
    protocol on Amazon-style data). Each user's events in order (time, then item id, then label);
    the ``test_last_n`` last positives and everything after the first of them are test, the
    ``valid_last_n`` positives before them (and what follows them) validation, the rest
    training. A user with fewer than ``test_last_n + valid_last_n + 1`` positives is training
    only (``users_too_short``).

``auto`` (the default)
    The global time cut, unless fewer than ``auto_min_known`` of its test events come from users
    with training events (their user embeddings would be untrained, so every comparison of the
    arms would mostly measure cold-start users; MovieLens' global cut leaves 6% of its test
    events to known users) or it leaves a part empty (all events at a few times): then
    per_user. The facts record the choice and why (``SplitFacts.auto``).

Events at the same time in one user's sequence are ordered by item id, so a split never depends
on how Spark read the files.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import TYPE_CHECKING

from feature_store.facts import SplitFacts
from feature_store.schemas import PARTS
from pipelines.accounting import UnusableData
from pipelines.config import SplitConfig

if TYPE_CHECKING:
    from pyspark.sql import DataFrame


def _utc(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def time_bounds(cfg: SplitConfig, events: "DataFrame") -> tuple[dt.datetime, dt.datetime]:
    """global_time and last_days: (validation start, test start) as UTC datetimes."""
    from pyspark.sql import functions as F

    row = events.agg(F.min("ts").alias("lo"), F.max("ts").alias("hi")).first()
    if row["lo"] is None:
        raise UnusableData("the events table is empty: nothing to split into training, "
                           "validation and test; check the ingest report")
    lo, hi = _utc(row["lo"]), _utc(row["hi"])
    if cfg.mode == "last_days":
        end = dt.datetime(hi.year, hi.month, hi.day, tzinfo=dt.timezone.utc) + dt.timedelta(1)
        test_start = end - dt.timedelta(days=cfg.test_days)
        return test_start - dt.timedelta(days=cfg.valid_days), test_start
    if cfg.train_end:
        test_start = _utc(dt.datetime.fromisoformat(cfg.train_end.replace("Z", "+00:00")))
    else:
        test_start = lo + (hi - lo) * cfg.train_share
    valid_start = test_start - (test_start - lo) * cfg.valid_share
    return valid_start, test_start


def split_events(events: "DataFrame", cfg: SplitConfig) -> tuple["DataFrame", dict]:
    """``events`` with a ``part`` column, and the bounds the split used (``test_start``,
    ``valid_start`` for global_time, as ISO strings; None for per_user)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    if cfg.mode == "auto":
        raise ValueError("split.mode auto chooses between two splits: call auto_split")
    if cfg.mode in ("global_time", "last_days"):
        valid_start, test_start = time_bounds(cfg, events)
        part = (F.when(F.col("ts") >= F.lit(test_start), "test")
                .when(F.col("ts") >= F.lit(valid_start), "valid").otherwise("train"))
        return events.withColumn("part", part), {"test_start": test_start.isoformat(),
                                                  "valid_start": valid_start.isoformat()}
    if cfg.test_last_n < 1 or cfg.valid_last_n < 0:
        raise UnusableData("split.test_last_n must be >= 1 and split.valid_last_n >= 0")
    user = Window.partitionBy("user_id")
    order = Window.partitionBy("user_id").orderBy("ts", "item_id", "label")
    # Positives from this event to the end of the user's sequence (this one included).
    after = Window.partitionBy("user_id").orderBy(
        F.col("_seq").desc()).rowsBetween(Window.unboundedPreceding, Window.currentRow)
    is_pos = F.col("label") == 1
    test_n, valid_n = cfg.test_last_n, cfg.test_last_n + cfg.valid_last_n
    df = (events.withColumn("_seq", F.row_number().over(order))
          .withColumn("_pos_after", F.sum(is_pos.cast("int")).over(after))
          .withColumn("_n_pos", F.max("_pos_after").over(user))
          .withColumn("_test_seq", F.min(F.when(is_pos & (F.col("_pos_after") <= test_n),
                                                F.col("_seq"))).over(user))
          .withColumn("_valid_seq", F.min(F.when(is_pos & (F.col("_pos_after") <= valid_n),
                                                 F.col("_seq"))).over(user)))
    part = (F.when(F.col("_n_pos") < valid_n + 1, "train")
            .when(F.col("_seq") >= F.col("_test_seq"), "test")
            .when(F.col("_seq") >= F.col("_valid_seq"), "valid").otherwise("train"))
    return (df.withColumn("part", part)
            .drop("_seq", "_pos_after", "_n_pos", "_test_seq", "_valid_seq"),
            {"test_start": None, "valid_start": None})


def split_facts(split: "DataFrame", cfg: SplitConfig, bounds: dict) -> SplitFacts:
    """Count what the split produced and refuse a split the protocol cannot use
    (:class:`~pipelines.accounting.UnusableData`)."""
    from pyspark.sql import functions as F

    per_part = {r["part"]: r for r in split.groupBy("part").agg(
        F.count("*").alias("rows"), F.sum(F.col("label").cast("long")).alias("positives"),
        F.countDistinct("user_id").alias("users")).collect()}
    rows = {p: int(per_part[p]["rows"]) if p in per_part else 0 for p in PARTS}
    positives = {p: int(per_part[p]["positives"] or 0) if p in per_part else 0 for p in PARTS}
    users = {p: int(per_part[p]["users"]) if p in per_part else 0 for p in PARTS}
    trained = split.where(F.col("part") == "train").select("user_id").distinct()
    # One join gives both the known test users and their test events (auto reads the latter).
    k = (split.where(F.col("part") == "test").select("user_id")
         .join(trained, "user_id", "left_semi")
         .agg(F.count("*").alias("rows"), F.countDistinct("user_id").alias("users")).first())
    known, known_rows = int(k["users"]), int(k["rows"])
    too_short = 0
    if cfg.mode == "per_user":
        need = cfg.test_last_n + cfg.valid_last_n + 1
        too_short = (split.groupBy("user_id").agg(F.sum(F.col("label").cast("int")).alias("n"))
                     .where(F.col("n") < need).count())
    facts = SplitFacts(cfg.mode, bounds["test_start"], bounds["valid_start"], rows, positives,
                       users, known, users["test"] - known, too_short,
                       test_events_known=known_rows)
    check_usable(facts, cfg)
    return facts


def auto_split(events: "DataFrame", cfg: SplitConfig, storage=None
               ) -> tuple["DataFrame", dict, SplitFacts]:
    """``split.mode: auto``: the global time cut when at least ``cfg.auto_min_known`` of its
    test events have a user with training events, else per_user. Returns the chosen split
    (persisted with ``storage``, default MEMORY_AND_DISK), its bounds and its facts, whose
    ``auto`` says what was chosen and why; :class:`UnusableData` when neither mode can be used."""
    from pyspark import StorageLevel

    storage = storage or StorageLevel.MEMORY_AND_DISK
    glob = dataclasses.replace(cfg, mode="global_time")
    split = None
    try:
        split, bounds = split_events(events, glob)
        split = split.persist(storage)
        facts = split_facts(split, glob, bounds)
    except UnusableData as e:
        if split is not None:
            split.unpersist()
        split, why, global_error = None, f"cannot be used ({e})", e
    else:
        known = facts.test_events_known
        share = known / max(facts.rows["test"], 1)
        why = (f"gives {known} of its {facts.rows['test']} test events ({share:.1%}) to users "
               f"with training events")
        if share >= cfg.auto_min_known:
            return split, bounds, dataclasses.replace(
                facts, auto=f"global_time: the global time cut {why} "
                            f"(split.auto_min_known {cfg.auto_min_known:.0%})")
        why, global_error = why + f", below split.auto_min_known {cfg.auto_min_known:.0%}", None
    per = dataclasses.replace(cfg, mode="per_user")
    per_split, per_bounds = split_events(events, per)
    per_split = per_split.persist(storage)
    try:
        per_facts = split_facts(per_split, per, per_bounds)
    except UnusableData as e:
        per_split.unpersist()
        if global_error is not None:
            raise UnusableData(f"{global_error} (split.mode auto also tried per_user: {e})"
                               ) from None
        # The global cut is usable, only a poor fit: better than no split.
        return split, bounds, dataclasses.replace(
            facts, auto=f"global_time: the global time cut {why}, but per_user cannot be used "
                        f"({e})")
    if split is not None:
        split.unpersist()
    return per_split, per_bounds, dataclasses.replace(
        per_facts, auto=f"per_user: the global time cut {why}")


def check_usable(f: SplitFacts, cfg: SplitConfig) -> None:
    """Raise :class:`UnusableData` naming what is missing when the split cannot serve training
    and evaluation."""
    total = sum(f.rows.values())
    if total == 0:
        raise UnusableData("the events table is empty: nothing to split; check the ingest "
                           "report (were all events quarantined?)")
    if sum(f.positives.values()) == 0:
        raise UnusableData(f"none of the {total} events is a positive (every label is 0): "
                           "nothing to learn or evaluate")
    if cfg.mode == "per_user":
        need = cfg.test_last_n + cfg.valid_last_n + 1
        if f.users["test"] == 0:
            raise UnusableData(
                f"the per_user split needs users with at least {need} positives "
                f"(split.test_last_n + split.valid_last_n + 1); none of the "
                f"{f.users_too_short} users has that many")
        return
    where = f"test from {f.test_start}, validation from {f.valid_start}"
    for part, why in (("train", "raise split.train_share or set a later split.train_end"),
                      ("test", "lower split.train_share or set an earlier split.train_end")):
        if f.rows[part] == 0:
            raise UnusableData(f"the {f.mode} split leaves the {part} part empty ({where}): "
                               f"the events span too short a time for it; {why}, or use "
                               f"split.mode: per_user")
    if cfg.valid_share > 0 and f.rows["valid"] == 0:
        raise UnusableData(f"the {f.mode} split leaves the validation part empty ({where}); "
                           f"raise split.valid_share or set it to 0 for no validation slice")
