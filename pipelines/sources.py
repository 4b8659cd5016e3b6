"""Raw-data adapters: every source becomes (raw items, raw events, raw dated item tags or None)
DataFrames in the generic input format that :mod:`pipelines.ingest` validates.

The generic format (README "Bring your own data"):

items file (CSV or Parquet)
    ``item_id`` (string or integer), ``title``; optional ``text``, ``tags`` (list, or a
    ``|``-separated string), ``image`` (encoded bytes, or a path relative to
    ``source.images_dir``), ``video`` (list of encoded frames, or a path to a GIF), ``created_at``
    (timestamp, ISO-8601 string or epoch seconds).
events file (CSV or Parquet)
    ``user_id``, ``item_id``, ``ts``; and ``label`` (0/1), or ``rating`` (positive when
    >= ``source.rating_threshold``), or neither (implicit feedback: every event is a positive);
    optional ``weight``. ``source.feedback: implicit`` reads every event as a positive whatever
    its columns.
item tags file (optional, CSV or Parquet)
    ``item_id``, ``tag``, ``ts``; optional ``user_id`` (who wrote it). Dated attributes: a tag
    reaches an item's text only when dated before its author's split point.
"""

from __future__ import annotations

import os
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.config import SourceConfig


class SourceError(ValueError):
    """The configured source cannot be found or read."""


def read_table_file(spark: SparkSession, path: str, what: str) -> DataFrame:
    """A CSV or Parquet file (or folder of Parquet files) as a DataFrame; CSV columns stay strings
    so that bad values are quarantined by ingest rather than silently nulled by inference."""
    if not path:
        raise SourceError(f"source.{what} is not set; point it at a CSV or Parquet file")
    local = "://" not in path
    if local and not os.path.exists(path):
        raise SourceError(f"source.{what}: {path} does not exist")
    lower = path.lower()
    uri = Path(path).resolve().as_uri() if local else path
    if lower.endswith((".csv", ".csv.gz", ".tsv")):
        sep = "\t" if lower.endswith(".tsv") else ","
        return (spark.read.option("header", True).option("inferSchema", False)
                .option("quote", '"').option("escape", '"').option("multiLine", True)
                .option("mode", "PERMISSIVE").option("sep", sep).csv(uri))
    if lower.endswith(".parquet") or (local and os.path.isdir(path)):
        return spark.read.parquet(uri)
    raise SourceError(f"source.{what}: {path} is neither .csv/.tsv nor .parquet")


def generic_source(spark: SparkSession, source: SourceConfig
                   ) -> tuple[DataFrame, DataFrame, DataFrame | None]:
    """(raw items, raw events, raw dated item tags or None) from ``source.items`` /
    ``source.events`` / ``source.item_tags``."""
    items = read_table_file(spark, source.items, "items")
    events = read_table_file(spark, source.events, "events")
    tags = read_table_file(spark, source.item_tags, "item_tags") if source.item_tags else None
    if source.images_dir:
        base = os.path.abspath(source.images_dir) if "://" not in source.images_dir else \
            source.images_dir
        for col in ("image", "video", "image_path"):
            if col in items.columns and dict(items.dtypes)[col] == "string":
                items = items.withColumn(col, _resolve(F.col(col), base))
    return items, events, tags


def _resolve(c, base: str):
    absolute = c.startswith("/") | c.contains("://")
    return F.when(c.isNull() | (F.trim(c) == ""), F.lit(None)).when(absolute, c).otherwise(
        F.concat(F.lit(base.rstrip("/") + "/"), c))


def movielens_source(spark: SparkSession, source: SourceConfig
                     ) -> tuple[DataFrame, DataFrame, DataFrame]:
    """MovieLens ``ml-latest-small`` (+ posters) in the generic format.

    Items: title, text = title + genres, tags = genres, image = ``<posters_dir>/<movieId>.jpg``
    when the file exists. The user tags of ``tags.csv`` are dated behaviour, not content: they
    come back as the third table (item_id, user_id, tag, ts), and the embed stage adds to an
    item's tags only those dated before the split point of the user who wrote them. Movies have
    no creation time in MovieLens, so ``created_at`` is left empty. Events: ratings with their
    epoch-second timestamps; ``rating`` becomes the label by ``source.rating_threshold`` (4.0).
    """
    base = source.movielens_dir
    for name in ("movies.csv", "ratings.csv", "tags.csv"):
        if not os.path.exists(os.path.join(base, name)):
            raise SourceError(f"source.movielens_dir: {base} has no {name}; point it at an "
                              f"extracted ml-latest-small folder")
    movies = read_table_file(spark, os.path.join(base, "movies.csv"), "movielens_dir")
    ratings = read_table_file(spark, os.path.join(base, "ratings.csv"), "movielens_dir")
    tags = read_table_file(spark, os.path.join(base, "tags.csv"), "movielens_dir")
    genres = F.filter(F.split(F.col("genres"), r"\|"),
                      lambda g: (g != "(no genres listed)") & (g != ""))
    items = movies.select(F.col("movieId").alias("item_id"), "title",
                          F.concat_ws(" | ", F.col("title"), F.array_join(genres, ", "))
                          .alias("text"),
                          genres.alias("tags"))
    if source.posters_dir:
        if not os.path.isdir(source.posters_dir):
            raise SourceError(f"source.posters_dir: {source.posters_dir} is not a folder")
        posters_dir = os.path.abspath(source.posters_dir)
        # A few thousand names: listing on the driver is fine; file bytes are read by executors.
        names = [(n[:-4], os.path.join(posters_dir, n)) for n in os.listdir(posters_dir)
                 if n.endswith(".jpg")]
        posters = spark.createDataFrame(names, "item_id string, image string")
        items = items.join(posters, "item_id", "left")
    events = ratings.select(F.col("userId").alias("user_id"), F.col("movieId").alias("item_id"),
                            F.col("timestamp").alias("ts"), "rating")
    item_tags = tags.select(F.col("movieId").alias("item_id"), F.col("userId").alias("user_id"),
                            "tag", F.col("timestamp").alias("ts"))
    return items, events, item_tags
