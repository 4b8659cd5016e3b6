"""The MovieLens adapter on a real slice of ml-latest-small with its real posters."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pytest

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
                      ingest: IngestConfig, tags_raw=None):
    """Run the Spark ingest and write its tables as the ``ingest`` stage does; returns the
    frames and the checked counts."""
    frames = run_ingest(spark, items_raw, events_raw, source, ingest, raw_tags=tags_raw)
    manifests = {name: store.write_spark(name, df, schema, parents=[], config_hash="ml",
                                         facts=facts)
                 for name, (df, schema, facts) in frames.tables().items()}
    counts = frames.counts({t: m.row_count for t, m in manifests.items()},
                           frames.quarantine_reasons())
    frames.release()
    return frames, counts


def test_movielens_slice_ingests_with_posters_and_rating_labels(spark, tmp_path, shared_data):
    source, ratings, keep = _movielens_slice(tmp_path, shared_data, 150)
    items_raw, events_raw, tags_raw = movielens_source(spark, source)
    store = SnapshotStore(str(tmp_path / "store"))
    res, counts = _ingest_and_write(spark, store, items_raw, events_raw, source,
                                    IngestConfig(image_partitions=2), tags_raw)

    assert counts["items"] == {"in": 150, "out": 150, "quarantined": 0}
    assert counts["events"] == {"in": len(ratings), "out": len(ratings), "quarantined": 0}
    n_tags = tags_raw.count()
    assert counts["item_tags"]["in"] == n_tags == counts["item_tags"]["out"] + \
        counts["item_tags"]["quarantined"]
    assert res.label_mode == "rating"

    items = store.read_arrow("items").to_pandas()
    idmap = dict(zip(*store.read_arrow("item_id_map").to_pydict().values()))
    with_poster = {m for m in keep if (shared_data / "ml-posters" / f"{m}.jpg").exists()}
    assert items.image.notna().sum() == len(with_poster) > 0
    toy = items[items.item_id == idmap["1"]].iloc[0]
    assert toy.title == "Toy Story (1995)"
    # Genres are content; the users' tags are dated behaviour, kept apart with their authors.
    assert {"Animation", "Comedy"} <= set(toy.tags) and "pixar" not in set(toy.tags)
    tags = store.read_arrow("item_tags").to_pandas()
    assert "pixar" in set(tags[tags.item_id == idmap["1"]].tag)
    assert tags.user_id.notna().any() and (tags.tag == tags.tag.str.strip().str.lower()).all()
    assert toy.image[:2] == b"\xff\xd8"  # the real JPEG poster bytes

    events = store.read_arrow("events").to_pandas()
    assert events.label.sum() == (ratings.rating >= 4.0).sum()
    assert events.ts.min() == pd.Timestamp(ratings.timestamp.min(), unit="s", tz="UTC")


def test_single_process_ingest_agrees_with_spark_on_a_movielens_slice(spark, tmp_path,
                                                                       shared_data):
    # The adapter's output as Arrow: string ids, epoch seconds and ratings as CSV strings,
    # posters as paths: the rating mode of both engines on real data.
    source, ratings, _ = _movielens_slice(tmp_path, shared_data, 60)
    items_raw, events_raw, _ = movielens_source(spark, source)
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


def _split_slice(spark, tmp_path, shared_data, n_movies, split_cfg, **source_kw):
    """Ingest a MovieLens slice (with its dated tags) and split its events."""
    import dataclasses

    from pipelines.split import split_events, split_facts

    source, ratings, _ = _movielens_slice(tmp_path, shared_data, n_movies)
    source = dataclasses.replace(source, posters_dir=None, **source_kw)
    items_raw, events_raw, tags_raw = movielens_source(spark, source)
    frames = run_ingest(spark, items_raw, events_raw, source, IngestConfig(image_partitions=2),
                        raw_tags=tags_raw)
    split, bounds = split_events(frames.events, split_cfg)
    return frames, split, split_facts(split, split_cfg, bounds), ratings


@pytest.mark.parametrize("mode", ["global_time", "per_user"])
def test_no_tag_dated_after_its_authors_split_point_reaches_an_item(spark, tmp_path, shared_data,
                                                                     mode):
    from pipelines.config import SplitConfig
    from pipelines.item_tags import allowed_tags, with_allowed_tags

    frames, split, facts, _ = _split_slice(spark, tmp_path, shared_data, 300,
                                           SplitConfig(mode=mode))
    tags = frames.item_tags.toPandas()
    ev = split.toPandas()
    # The rule, computed independently: before the validation part (global), or before the
    # author's first validation/test event (per user; unbounded for training-only authors).
    if mode == "global_time":
        cutoff = pd.Series(pd.Timestamp(facts.valid_start), index=tags.index)
    else:
        firsts = ev[ev.part != "train"].groupby("user_id").ts.min()
        cutoff = tags.user_id.map(firsts).fillna(pd.Timestamp.max.tz_localize("UTC"))
    ts = pd.to_datetime(tags.ts, utc=True)
    expected = set(zip(tags.item_id[ts < pd.to_datetime(cutoff, utc=True)],
                       tags.tag[ts < pd.to_datetime(cutoff, utc=True)]))
    got = {(r["item_id"], r["tag"]) for r in allowed_tags(frames.item_tags, split, facts)
           .collect()}
    assert got == expected
    assert got and set(zip(tags.item_id, tags.tag)) - got   # tags on both sides of the cut
    # The leak the rule exists for: users who tagged the very item they are evaluated on, after
    # their evaluation began. Those tags (unless somebody wrote them in time) are not allowed.
    evaluated = ev[ev.part != "train"][["user_id", "item_id"]].drop_duplicates()
    late = tags[ts >= pd.to_datetime(cutoff, utc=True)].merge(evaluated, on=["user_id", "item_id"])
    only_late = set(zip(late.item_id, late.tag)) - expected
    assert only_late and not only_late & got
    merged = with_allowed_tags(frames.items, allowed_tags(frames.item_tags, split, facts))
    on_items = {(r["item_id"], t) for r in merged.collect() for t in r["tags"]}
    assert not only_late & on_items
    frames.release()


def test_per_user_split_of_implicit_movielens_evaluates_every_user_with_three_positives(
        spark, tmp_path, shared_data):
    from pipelines.config import SplitConfig

    frames, split, facts, ratings = _split_slice(spark, tmp_path, shared_data, 300,
                                                 SplitConfig(mode="per_user"),
                                                 feedback="implicit")
    assert frames.label_mode == "implicit"
    ev = split.toPandas()
    assert (ev.label == 1).all() and len(ev) == len(ratings)       # every rating a positive
    per_user = ev.groupby("user_id").size()
    tested = set(ev[ev.part == "test"].user_id)
    assert tested == set(per_user[per_user >= 3].index)
    assert set(ev[ev.part == "valid"].user_id) == tested
    assert (ev[ev.part == "test"].groupby("user_id").size() == 1).all()
    assert facts.users_too_short == int((per_user < 3).sum())
    assert facts.test_users_known == len(tested) and facts.test_users_new == 0
    frames.release()
