"""The MovieLens adapter on a real slice of ml-latest-small with its real posters."""

from __future__ import annotations

import csv

import pandas as pd

from feature_store.snapshots import SnapshotStore
from jobs.config import IngestConfig, SourceConfig
from pipelines.ingest import run_ingest
from pipelines.sources import movielens_source


def test_movielens_slice_ingests_with_posters_and_rating_labels(spark, tmp_path, shared_data):
    ml = shared_data / "ml-latest-small"
    movies = pd.read_csv(ml / "movies.csv").head(150)
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
    items_raw, events_raw = movielens_source(spark, source)
    store = SnapshotStore(str(tmp_path / "store"))
    res = run_ingest(spark, store, items_raw, events_raw, source,
                     IngestConfig(image_partitions=2), parents=[], config_hash="ml")

    assert res.counts["items"] == {"in": 150, "out": 150, "quarantined": 0}
    assert res.counts["events"] == {"in": len(ratings), "out": len(ratings), "quarantined": 0}
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
