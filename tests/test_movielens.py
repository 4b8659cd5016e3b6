"""The MovieLens adapter on a real slice of ml-latest-small with its real posters."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

from feature_store.snapshots import SnapshotStore
from pipelines.config import IngestConfig, SourceConfig
from pipelines.ingest import run_ingest
from pipelines.ingest_local import ingest_local
from pipelines.sources import movielens_source


def _movielens_slice(tmp_path: Path, shared_data: Path, n_movies: int):
    """The first ``n_movies`` movies of ml-latest-small with their ratings and tags, as a
    MovieLens folder; returns the source config and the ratings kept."""
    ml = shared_data / "ml-latest-small"
    movies = pd.read_csv(ml / "movies.csv").head(n_movies)
    keep = set(movies.movieId)
    ratings = pd.read_csv(ml / "ratings.csv")
    ratings = ratings[ratings.movieId.isin(keep)]
    tags = pd.read_csv(ml / "tags.csv")
    tags = tags[tags.movieId.isin(keep)]
    sub = tmp_path / "ml"
    sub.mkdir()
    movies.to_csv(sub / "movies.csv", index=False, quoting=csv.QUOTE_MINIMAL)
    ratings.to_csv(sub / "ratings.csv", index=False)
    tags.to_csv(sub / "tags.csv", index=False)
    source = SourceConfig(kind="movielens", movielens_dir=str(sub),
                          posters_dir=str(shared_data / "ml-posters"))
    return source, ratings, keep


def _ingest_and_write(spark, store: SnapshotStore, items_raw, events_raw, source: SourceConfig,
                      ingest: IngestConfig):
    """Run the Spark ingest and write its tables as the ``ingest`` stage does; returns the
    frames and the checked counts."""
    frames = run_ingest(spark, items_raw, events_raw, source, ingest)
    manifests = {name: store.write_spark(name, df, schema, parents=[], config_hash="ml",
                                         facts=facts)
                 for name, (df, schema, facts) in frames.tables().items()}
    counts = frames.counts({t: manifests[t].row_count for t in ("items", "events")},
                           frames.quarantine_reasons())
    frames.release()
    return frames, counts


def test_movielens_slice_ingests_with_posters_and_rating_labels(spark, tmp_path, shared_data):
    source, ratings, keep = _movielens_slice(tmp_path, shared_data, 150)
    items_raw, events_raw = movielens_source(spark, source)
    store = SnapshotStore(str(tmp_path / "store"))
    res, counts = _ingest_and_write(spark, store, items_raw, events_raw, source,
                                    IngestConfig(image_partitions=2))

    assert counts["items"] == {"in": 150, "out": 150, "quarantined": 0}
    assert counts["events"] == {"in": len(ratings), "out": len(ratings), "quarantined": 0}
    assert res.label_mode == "rating"

    items = store.read_arrow("items").to_pandas()
    idmap = dict(zip(*store.read_arrow("item_id_map").to_pydict().values()))
    with_poster = {m for m in keep if (shared_data / "ml-posters" / f"{m}.jpg").exists()}
    assert items.image.notna().sum() == len(with_poster) > 0
    toy = items[items.item_id == idmap["1"]].iloc[0]
    assert toy.title == "Toy Story (1995)"
    assert {"Animation", "Comedy"} <= set(toy.tags) and "pixar" in set(toy.tags)
    assert toy.image[:2] == b"\xff\xd8"  # the real JPEG poster bytes

    events = store.read_arrow("events").to_pandas()
    assert events.label.sum() == (ratings.rating >= 4.0).sum()
    assert events.ts.min() == pd.Timestamp(ratings.timestamp.min(), unit="s", tz="UTC")


def test_single_process_ingest_agrees_with_spark_on_a_movielens_slice(spark, tmp_path,
                                                                       shared_data):
    # The adapter's output as Arrow: string ids, epoch seconds and ratings as CSV strings,
    # posters as paths: the rating mode of both engines on real data.
    source, ratings, _ = _movielens_slice(tmp_path, shared_data, 60)
    items_raw, events_raw = movielens_source(spark, source)
    ingest = IngestConfig(image_partitions=2)
    frames = run_ingest(spark, items_raw, events_raw, source, ingest)
    reasons = frames.quarantine_reasons()
    counts = frames.counts({"items": frames.items.count(), "events": frames.events.count()},
                           reasons)
    local = ingest_local(items_raw.toArrow(), events_raw.toArrow(), source, ingest)

    assert local.label_mode == frames.label_mode == "rating"
    assert local.counts == counts and local.counts["events"]["in"] == len(ratings)
    assert local.quarantine_reasons == reasons
    for name in ("item_id_map", "user_id_map"):
        assert local.__dict__[name].to_pylist() == \
            getattr(frames, name).toArrow().sort_by("id").to_pylist()
    columns = ["item_id", "title", "text", "tags", "image", "image_path"]
    assert local.items.select(columns).sort_by("item_id").to_pylist() == \
        frames.items.toArrow().select(columns).sort_by("item_id").to_pylist()
    keys = [("user_id", "ascending"), ("item_id", "ascending"), ("ts", "ascending")]
    assert local.events.sort_by(keys).to_pylist() == \
        frames.events.toArrow().cast(local.events.schema).sort_by(keys).to_pylist()
    frames.release()
