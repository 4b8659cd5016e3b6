"""The synthetic world is deterministic and has the latent structure DESIGN.md §7 promises."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
from PIL import Image

from pipelines.config import WorldConfig
from pipelines import synthetic as syn

CFG = WorldConfig(n_items=300, n_users=80, impressions_per_user=80, image_size=24,
                  video_frames=4, video_size=16, chunk_items=128)


def _digest(tables):
    h = hashlib.sha256()
    for col in pa.concat_tables(tables).columns:
        h.update(str(col.to_pylist()).encode())
    return h.hexdigest()


def test_same_seed_same_world_and_chunking_does_not_matter():
    lat = syn.draw_latents(CFG)
    a = _digest(syn.item_chunks(CFG, lat, progress=False))
    cfg2 = WorldConfig(**{**CFG.__dict__, "chunk_items": 77})
    b = _digest(syn.item_chunks(cfg2, syn.draw_latents(cfg2), progress=False))
    assert a == b
    e1, _ = syn.simulate_events(CFG, lat)
    e2, _ = syn.simulate_events(CFG, syn.draw_latents(CFG))
    assert e1.equals(e2)
    other = WorldConfig(**{**CFG.__dict__, "seed": 1})
    e3, _ = syn.simulate_events(other, syn.draw_latents(other))
    assert not e1.equals(e3)


def test_items_have_decodable_images_videos_and_multilabel_tags():
    lat = syn.draw_latents(CFG)
    items = pa.concat_tables(syn.item_chunks(CFG, lat, progress=False))
    for row in items.slice(0, 20).to_pylist():
        im = Image.open(io.BytesIO(row["image"]))
        assert im.size == (24, 24)
        assert len(row["video"]) == 4
        frames = [np.asarray(Image.open(io.BytesIO(f))) for f in row["video"]]
        assert not np.array_equal(frames[0], frames[-1])  # the object moves
        assert len(row["tags"]) >= 3  # >= one shape + colour + background
    i = 5
    tags = items.slice(i, 1).column("tags").to_pylist()[0]
    assert syn.SHAPES[lat.shape[i]] in tags and syn.COLOUR_NAMES[lat.colour[i]] in tags


def test_cold_items_appear_after_cutoff_and_no_impression_precedes_creation():
    lat = syn.draw_latents(CFG)
    assert (lat.created_ms[lat.cold] >= lat.cutoff_ms).all()
    assert (lat.created_ms[~lat.cold] < lat.cutoff_ms).all()
    events, truth = syn.simulate_events(CFG, lat)
    idx = np.array([int(s[1:]) for s in events.column("item_id").to_pylist()])
    ts = events.column("ts").cast(pa.int64()).to_numpy()
    assert (ts >= lat.created_ms[idx]).all()
    assert truth.num_rows == events.num_rows


def test_clicks_follow_the_documented_click_model():
    cfg = WorldConfig(**{**CFG.__dict__, "n_users": 400, "impressions_per_user": 150})
    lat = syn.draw_latents(cfg)
    events, truth = syn.simulate_events(cfg, lat)
    u = np.array([int(s[1:]) for s in events.column("user_id").to_pylist()])
    i = np.array([int(s[1:]) for s in events.column("item_id").to_pylist()])
    p = 1 / (1 + np.exp(-(cfg.base_logit + cfg.affinity * lat.pref[u, lat.topic[i]]
                          + lat.item_bias[i] + lat.user_bias[u])))
    np.testing.assert_allclose(truth.column("p_click").to_numpy(), p, rtol=1e-5)
    label = events.column("label").to_numpy()
    # Labels are Bernoulli(p): calibrated in aggregate, and preference drives clicks.
    assert abs(label.mean() - p.mean()) < 0.01
    fav = lat.pref[u, lat.topic[i]] > 0.3
    assert label[fav].mean() > 2 * label[~fav].mean()


def test_topic_is_only_partly_revealed_and_nuisance_is_independent():
    cfg = WorldConfig(n_items=5000)
    lat = syn.draw_latents(cfg)
    follows = np.mean(lat.shape == lat.topic % len(syn.SHAPES))
    assert 0.75 < follows < 0.9  # shape_fidelity 0.8 plus chance agreement
    # Colour says nothing about the topic.
    table = np.zeros((cfg.n_topics, len(syn.COLOURS)))
    np.add.at(table, (lat.topic, lat.colour), 1)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    chi2 = ((table - expected) ** 2 / expected).sum()
    assert chi2 < 100  # dof 49: independent
