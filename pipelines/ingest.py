"""The ingest stage (Spark): raw items, events and dated item tags → validated ``items``,
``events`` and ``item_tags`` snapshots, dense int64 id maps, and a ``quarantine`` table with a
machine-readable reason per rejected row.

Raw input, whatever its source (the generic file format, MovieLens, the synthetic world), is first
brought to one *canonical raw* shape by :mod:`pipelines.ingest_canonical`; a column that is
missing or of a type that cannot mean what its name says stops the stage with ``SchemaError``
naming it. Row-level problems never stop the stage: each bad row goes to
quarantine with the first reason that applies, so ``rows in = rows out + rows quarantined`` for
every input table (checked by :meth:`IngestFrames.counts`; ``RowAccountingError`` otherwise).

Checks, in order (first failure wins), as declared in :mod:`pipelines.ingest_rules` (the
single-process :mod:`pipelines.ingest_local` is built from the same tables; this list is
:func:`~pipelines.ingest_rules.describe_rules`, and a test keeps it so):

* items: missing_item_id (item_id blank), missing_title (title blank), unparseable_timestamp
  (created_at given but does not parse), then duplicate_key (same item_id; the row with the
  smallest created_at, then smallest title is kept), then media: image_not_found,
  undecodable_image, image_too_large, image_too_small, video_not_found, undecodable_video.
* events: missing_user_id (user_id blank), missing_item_id (item_id blank), unparseable_timestamp
  (ts missing or not a time), invalid_label (label not one of 0, 1; label mode), invalid_rating
  (rating not a number; rating mode), invalid_weight (weight given but does not parse),
  unknown_item (item_id not in the items input), item_quarantined (item_id not in the items that
  passed validation), then duplicate_key (same user_id, item_id, ts; the row with the highest
  label, then highest weight is kept).
* item_tags: missing_item_id (item_id blank), missing_tag (tag blank), unparseable_timestamp (ts
  missing or not a time), unknown_item (item_id not in the items input), item_quarantined (item_id
  not in the items that passed validation), then duplicate_key (same item_id, user_id, tag; the row
  with the smallest ts is kept).

The functions take and return DataFrames; the caller (the ``ingest`` stage) reads the raw input
and writes the snapshots.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from feature_store import schemas
from feature_store.facts import EventsFacts, ItemsFacts
from feature_store.schemas import spark_schema
from pipelines.accounting import UnusableData, check_rows
from pipelines.config import IngestConfig, SourceConfig
from pipelines.ingest_canonical import canonical_events, canonical_items, canonical_tags
from pipelines.ingest_rules import (EVENT_RULES, ITEM_RULES, TAG_RULES, KeepOnePerKey, Rule,
                                    TableRules, label_mode)
from pipelines.media import Reason, validate_media

log = logging.getLogger(__name__)

ITEM_QUARANTINED = Reason.ITEM_QUARANTINED


# ------------------------------------------------------------------------- validation
# The checks themselves are declared once, in pipelines/ingest_rules.py; this part compiles them
# to Spark expressions (pipelines/ingest_local.py compiles the same tables to pandas).


def _first_failure(df: DataFrame, rules: tuple[Rule, ...]) -> tuple:
    """The rules as (reason, detail) columns: those of the first rule that holds, null when none
    does. Both are one CASE WHEN over the rules, so the detail always belongs to the reason (a
    coalesce of per-rule details would fall through to a later rule's value when the first
    failing rule has no detail)."""
    reason = detail = None
    for r in rules:
        holds = r.when.spark(df)
        shown = F.col(r.detail).cast("string") if r.detail else F.lit(None).cast("string")
        reason = F.when(holds, F.lit(r.reason)) if reason is None else reason.when(
            holds, F.lit(r.reason))
        detail = F.when(holds, shown) if detail is None else detail.when(holds, shown)
    if reason is None:
        return F.lit(None).cast("string"), F.lit(None).cast("string")
    return reason.cast("string"), detail.cast("string")


def _keep_one_per_key(df: DataFrame, keep: KeepOnePerKey) -> DataFrame:
    """Mark all but the first row (by ``keep.order``) of each key among the still-valid rows as
    ``keep.reason``."""
    order = [F.col(k.column).desc_nulls_last() if k.descending else
             F.col(k.column).asc_nulls_last() for k in keep.order]
    rank = F.when(F.col("_reason").isNull(), F.row_number().over(
        Window.partitionBy(*keep.key, F.col("_reason").isNull()).orderBy(*order)))
    detail = F.concat(*[F.col(p).cast("string") if is_col else F.lit(p)
                        for p, is_col in keep.detail_parts()])
    dup = F.col("_rank") > 1
    return (df.withColumn("_rank", rank)
            .withColumn("_detail", F.when(dup, detail).otherwise(F.col("_detail")))
            .withColumn("_reason", F.when(dup, F.lit(keep.reason)).otherwise(F.col("_reason")))
            .drop("_rank"))


def classify_items(items: DataFrame, ingest: IngestConfig, *,
                   rules: TableRules = ITEM_RULES) -> DataFrame:
    """Add ``_reason`` / ``_detail`` (null for valid rows) to canonical raw items by ``rules``;
    load images given as paths and decode every image and video (in Python workers, batched
    over Arrow)."""
    reason, detail = _first_failure(items, rules.rules_for())
    df = _keep_one_per_key(items.withColumn("_reason", reason).withColumn("_detail", detail),
                           rules.keep_one)
    if not rules.media_reasons:
        return df
    df = df.repartition(ingest.image_partitions)
    max_bytes, min_side = ingest.max_image_bytes, ingest.min_image_side

    def decode(batches):
        for batch in batches:
            cols = batch.to_pydict()
            n = batch.num_rows
            images, videos = list(cols["image"]), list(cols["video"])
            reasons, details = list(cols["_reason"]), list(cols["_detail"])
            for i in range(n):
                if reasons[i] is not None:
                    continue
                img, vid, r, d = validate_media(images[i], cols["image_path"][i], videos[i],
                                                cols["video_path"][i], max_bytes, min_side)
                images[i], videos[i], reasons[i], details[i] = img, vid, r, d
            arrays = []
            for name in batch.schema.names:
                if name == "image":
                    arrays.append(pa.array(images, pa.binary()))
                elif name == "video":
                    arrays.append(pa.array(videos, pa.list_(pa.binary())))
                elif name == "_reason":
                    arrays.append(pa.array(reasons, pa.string()))
                elif name == "_detail":
                    arrays.append(pa.array(details, pa.string()))
                else:
                    arrays.append(batch.column(name))
            yield pa.RecordBatch.from_arrays(arrays, schema=batch.schema)

    return df.mapInArrow(decode, df.schema)


def classify_events(events: DataFrame, mode: str, source: SourceConfig,
                    raw_item_ids: DataFrame, valid_item_ids: DataFrame, *,
                    rules: TableRules = EVENT_RULES) -> DataFrame:
    """Add ``_reason`` / ``_detail`` and the parsed ``label`` (int8) to canonical raw events by
    ``rules`` under label ``mode``.

    ``raw_item_ids`` holds every item id of the items input (``item_ext``); ``valid_item_ids``
    those that passed validation (the id sets ``raw_item_ids`` / ``valid_item_ids`` of the
    rules' :class:`~pipelines.ingest_rules.NotAmong` checks).
    """
    df = _with_id_sets(events, rules, mode, raw_item_ids, valid_item_ids)
    reason, detail = _first_failure(df, rules.rules_for(mode))
    label = label_mode(mode).spark_label(F.col("value"), source.rating_threshold)
    df = (df.withColumn("_reason", reason).withColumn("_detail", detail)
          # Only valid rows get a label; NaN or 2.0 must not reach the (ANSI, failing) cast.
          .withColumn("label", F.when(F.col("_reason").isNull(), label.try_cast("byte")))
          .drop(*[among.flag for among in rules.id_sets(mode)]))
    return _keep_one_per_key(df, rules.keep_one)


def classify_tags(tags: DataFrame, raw_item_ids: DataFrame, valid_item_ids: DataFrame, *,
                  rules: TableRules = TAG_RULES) -> DataFrame:
    """Add ``_reason`` / ``_detail`` to canonical raw dated item tags by ``rules``."""
    df = _with_id_sets(tags, rules, None, raw_item_ids, valid_item_ids)
    reason, detail = _first_failure(df, rules.rules_for())
    df = (df.withColumn("_reason", reason).withColumn("_detail", detail)
          .drop(*[among.flag for among in rules.id_sets()]))
    return _keep_one_per_key(df, rules.keep_one)


def _with_id_sets(df: DataFrame, rules: TableRules, mode: Optional[str],
                  raw_item_ids: DataFrame, valid_item_ids: DataFrame) -> DataFrame:
    """``df`` with the flag column of each id set its rules check (both hold item ids)."""
    id_sets = {"raw_item_ids": raw_item_ids, "valid_item_ids": valid_item_ids}
    for among in rules.id_sets(mode):
        ids = id_sets[among.id_set].select(F.col("item_ext").alias(among.column),
                                          F.lit(True).alias(among.flag)).distinct()
        df = df.join(ids, among.column, "left")
    return df


def quarantine_rows(classified: DataFrame, table: str) -> DataFrame:
    """The rejected rows as quarantine records: the original row as JSON (binary values replaced
    by their byte length, lists of binary by their length)."""
    raw_cols = [c for c in classified.columns if c.startswith("__raw_")]
    shown = []
    for c in raw_cols:
        name = c[len("__raw_"):]
        t = classified.schema[c].dataType
        if isinstance(t, T.BinaryType):
            shown.append(F.length(F.col(c)).alias(f"{name}_bytes"))
        elif isinstance(t, T.ArrayType) and isinstance(t.elementType, T.BinaryType):
            shown.append(F.size(F.col(c)).alias(f"{name}_frames"))
        else:
            shown.append(F.col(c).alias(name))
    return (classified.where(F.col("_reason").isNotNull())
            .select(F.lit(table).alias("source_table"), F.col("_reason").alias("reason"),
                    F.col("_detail").alias("detail"),
                    F.to_json(F.struct(*shown), {"ignoreNullFields": "false"}).alias("row")))


def assign_dense_ids(external_ids: DataFrame,
                     previous: Optional[DataFrame]) -> tuple[DataFrame, DataFrame]:
    """Map external string ids to dense int64 ids, keeping every id ``previous`` already gave.

    New ids continue after the largest previous id, in sorted order of the external ids (so the
    same input gives the same ids). Returns the full map (``external_id``, ``id``) and the
    persisted frame it reads (release it once the map is written).

    In the JVM only: the new ids are range-partitioned and sorted, each row takes its position
    within its partition (``monotonically_increasing_id``), and a partition's first id is the
    sum of the sizes of the partitions before it (one small aggregate, collected). Keep the
    returned frame cached while the map is used: recomputed, it would draw new range bounds.
    """
    from pyspark import StorageLevel

    ids = external_ids.select(F.col("external_id")).distinct()
    offset = 0
    if previous is not None:
        ids = ids.join(previous.select("external_id"), "external_id", "left_anti")
        top = previous.agg(F.max("id")).first()[0]
        offset = 0 if top is None else int(top) + 1
    # Persisted: the range bounds, hence every row's position, are drawn once.
    placed = (ids.repartitionByRange("external_id").sortWithinPartitions("external_id")
              .select("external_id", F.monotonically_increasing_id().alias("_pos"))
              .persist(StorageLevel.MEMORY_AND_DISK))
    part = F.shiftright(F.col("_pos"), 33)          # the partition's index (its upper bits)
    sizes = dict(placed.groupBy(part.alias("p")).count().collect())
    starts, total = [], offset
    for p in range(max(sizes, default=-1) + 1):
        starts.append(total)
        total += sizes.get(p, 0)
    first_id = (F.element_at(F.array(*[F.lit(s).cast("long") for s in starts]),
                             (part + 1).cast("int")) if starts else F.lit(0).cast("long"))
    new = placed.select(F.col("external_id"),
                        (first_id + F.col("_pos") - F.shiftleft(part, 33)).alias("id"))
    full = new if previous is None else previous.select("external_id", "id").unionByName(new)
    return full, placed


# ------------------------------------------------------------------------- the stage


@dataclass
class IngestFrames:
    """The validated tables of one ingest, as DataFrames (their sources are persisted until
    :meth:`release`): the caller writes them, then checks :meth:`counts`."""

    items: DataFrame
    events: DataFrame
    #: Dated item tags (empty when the source has none).
    item_tags: DataFrame
    quarantine: DataFrame
    item_id_map: DataFrame
    user_id_map: DataFrame
    #: Raw rows read per input table (``items``, ``events``, and ``item_tags`` when given).
    rows_in: dict[str, int]
    label_mode: str
    _persisted: list = field(default_factory=list, repr=False)

    def tables(self) -> dict[str, tuple[DataFrame, pa.Schema, object]]:
        """Each output table with its schema and facts: what the caller writes."""
        return {
            "items": (self.items, schemas.items_schema(), ItemsFacts(self.rows_in["items"])),
            "events": (self.events, schemas.events_schema(),
                       EventsFacts(self.rows_in["events"], self.label_mode)),
            "item_tags": (self.item_tags, schemas.item_tags_schema(), None),
            "quarantine": (self.quarantine, schemas.quarantine_schema(), None),
            "item_id_map": (self.item_id_map, schemas.id_map_schema(), None),
            "user_id_map": (self.user_id_map, schemas.id_map_schema(), None),
        }

    def quarantine_reasons(self) -> dict[str, int]:
        """Quarantined rows per ``<table>.<reason>``."""
        return {f"{r['source_table']}.{r['reason']}": r["count"] for r in
                self.quarantine.groupBy("source_table", "reason").count().collect()}

    def counts(self, rows_out: dict[str, int], reasons: dict[str, int]) -> dict[str, dict]:
        """Rows in / out / quarantined per input table, given the rows written; raises
        :class:`RowAccountingError` when they do not add up."""
        out = {}
        for table in self.rows_in:
            q = sum(v for k, v in reasons.items() if k.startswith(f"{table}."))
            check_rows(f"ingest {table}", self.rows_in[table], rows_out[table], q)
            out[table] = {"in": self.rows_in[table], "out": rows_out[table], "quarantined": q}
        return out

    def release(self) -> None:
        for df in self._persisted:
            df.unpersist()


def _materialized(df: DataFrame) -> DataFrame:
    """``df`` (persisted) with its cache built: the planner then knows its real size, so a join
    with it is a broadcast when it is small (``spark.sql.autoBroadcastJoinThreshold``) and a
    shuffle join when it is not (an id map can be that large)."""
    df.count()
    return df


def run_ingest(spark: SparkSession, raw_items: DataFrame, raw_events: DataFrame,
               source: SourceConfig, ingest: IngestConfig, *,
               raw_tags: Optional[DataFrame] = None,
               previous_item_map: Optional[DataFrame] = None,
               previous_user_map: Optional[DataFrame] = None) -> IngestFrames:
    """Validate raw items, events and (optional) dated item tags, quarantine bad rows, and map
    ids to dense int64 ids, keeping every id the previous maps gave (pass them for ids stable
    across runs). Raises :class:`~pipelines.accounting.UnusableData` when no event is left;
    whatever it raises, it leaves nothing cached."""
    persisted: list[DataFrame] = []
    try:
        return _run_ingest(spark, raw_items, raw_events, source, ingest, raw_tags,
                           previous_item_map, previous_user_map, persisted)
    except BaseException:
        for df in persisted:
            df.unpersist()
        raise


def _run_ingest(spark: SparkSession, raw_items: DataFrame, raw_events: DataFrame,
                source: SourceConfig, ingest: IngestConfig, raw_tags: Optional[DataFrame],
                previous_item_map: Optional[DataFrame], previous_user_map: Optional[DataFrame],
                persisted: list) -> IngestFrames:
    """:func:`run_ingest`'s body; every frame it persists is appended to ``persisted``."""
    from pyspark import StorageLevel

    def keep(df: DataFrame) -> DataFrame:
        persisted.append(df.persist(StorageLevel.MEMORY_AND_DISK))
        return df

    items = canonical_items(raw_items, source)
    events, mode = canonical_events(raw_events, source)

    items_c = keep(classify_items(items, ingest))
    n_items_in = items_c.count()
    valid_items = items_c.where(F.col("_reason").isNull())

    item_map, item_placed = assign_dense_ids(
        valid_items.select(F.col("item_ext").alias("external_id")), previous_item_map)
    item_map = _materialized(keep(item_map))
    persisted.append(item_placed)       # released after the map that reads it

    events_c = keep(classify_events(events, mode, source, items.select("item_ext"),
                                    valid_items.select("item_ext")))
    n_events_in = events_c.count()
    valid_events = events_c.where(F.col("_reason").isNull())
    if n_events_in == 0:
        raise UnusableData("the events input has no rows: there is no behaviour to learn from "
                           "or evaluate; check source.events")
    if valid_events.limit(1).count() == 0:
        reasons = ", ".join(f"{r['_reason']}={r['count']}" for r in
                            events_c.groupBy("_reason").count().collect())
        raise UnusableData(f"all {n_events_in} events were quarantined ({reasons}): nothing is "
                           "left to learn from")
    user_map, user_placed = assign_dense_ids(
        valid_events.select(F.col("user_ext").alias("external_id")), previous_user_map)
    user_map = _materialized(keep(user_map))
    persisted.append(user_placed)
    item_ids = item_map.withColumnRenamed("external_id", "item_ext").withColumnRenamed(
        "id", "item_id")
    user_ids = user_map.withColumnRenamed("external_id", "user_ext").withColumnRenamed(
        "id", "user_id")

    items_out = (valid_items.join(item_map.withColumnRenamed("external_id", "item_ext"), "item_ext")
                 .select(F.col("id").alias("item_id"), "title", "text", "tags", "image",
                         "image_path", "video", F.col("created_ts")))
    events_out = (valid_events.join(item_ids, "item_ext").join(user_ids, "user_ext")
                  .select("user_id", "item_id", "ts", "label",
                          F.col("weight").cast("float").alias("weight"))
                  .sortWithinPartitions("user_id", "ts"))
    quarantine = quarantine_rows(items_c, "items").unionByName(
        quarantine_rows(events_c, "events"))
    rows_in = {"items": n_items_in, "events": n_events_in}
    if raw_tags is None:
        tags_out = spark.createDataFrame([], spark_schema(schemas.item_tags_schema()))
    else:
        tags_c = keep(classify_tags(canonical_tags(raw_tags, source), items.select("item_ext"),
                                    valid_items.select("item_ext")))
        rows_in["item_tags"] = tags_c.count()
        # Authors are users of the events; a tag by anybody else keeps a null author.
        tags_out = (tags_c.where(F.col("_reason").isNull()).join(item_ids, "item_ext")
                    .join(user_ids, "user_ext", "left")
                    .select("item_id", "user_id", "tag", "ts"))
        quarantine = quarantine.unionByName(quarantine_rows(tags_c, "item_tags"))
    return IngestFrames(items_out, events_out, tags_out, quarantine.coalesce(1),
                        item_map.coalesce(1), user_map.coalesce(1), rows_in, mode, persisted)
