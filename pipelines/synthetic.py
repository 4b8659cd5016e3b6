"""The synthetic multi-modal world: generated data with a known latent structure (DESIGN.md §7).

Items
    Each item has a behavioural **topic** t. Content reveals it only partly: the main object's
    *shape* is the topic's shape with probability ``shape_fidelity`` (else a random shape), the
    video's *motion* is the topic's motion with probability ``motion_fidelity``. The object's
    *colour* and the *background* are drawn uniformly and independently of the topic: they are
    the nuisance that dominates pixels and CV labels (tags name every shape, the colour and the
    background). Each item has a rendered PNG image (main object plus 0-2 smaller distractor
    objects, so the tag set is a real multi-label target), a short video (PNG frames, the object
    moving), a title, a caption-like text ("a red circle moves left over grass": action = motion,
    entity = object, scene = background) and tags. With ``caption_variety`` (opt-in) a caption
    names everything (40%) or only the motion ("something moves left"), the object ("a red
    circle") or the scene ("a clip over grass"), 20% each: the video-text model's gate must then
    learn which of its streams a caption speaks to.

Users
    ``pref[u] ~ Dirichlet(pref_concentration = 0.2)`` over topics (one or two favourites), a bias
    ``b_u ~ N(0, user_bias_std)`` and an activity level ``~ LogNormal(0, 0.5)`` that scales their
    number of impressions.

Click model (the ground truth)
    An impression of item i to user u at time ts happens only if the item exists
    (``created_ts <= ts``); which existing item is shown is uniform. It is clicked with
    ``p = sigmoid(base_logit + affinity * pref[u, topic(i)] + b_i + b_u)``, ``b_i ~ N(0,
    item_bias_std)``. Every impression is an event with ``label`` 0/1; ``truth_events`` keeps p.

Time
    Events fall uniformly in ``[start, start + days)``. The training cut-off is at
    ``train_share`` of the period; ``cold_share`` of the items are created after it (cold start),
    the others before it.

Everything is a deterministic function of ``seed`` and the sizes (rendering draws from a
per-item generator, so chunking does not change the output).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import ImageDraw
from tqdm.auto import tqdm

from feature_store.facts import WorldFacts
from feature_store.schemas import TS
from pipelines.config import WorldConfig
# The visual vocabulary and the drawing primitives (re-exported: callers read them here).
from pipelines.drawing import (ALL_BACKGROUNDS, ALL_SHAPES, BACKGROUNDS,  # noqa: F401
                               COLOUR_NAMES, COLOURS, DRIFT_BACKGROUNDS, MOTION_VEC, MOTIONS,
                               SHAPES, _bg, _draw_shape, _png)
from pipelines.synthetic_events import Event, event_caption, plan_events, render_events

log = logging.getLogger(__name__)

TITLE_WORDS = ["tale", "story", "clip", "moment", "scene", "show", "take", "daily", "vlog", "mix"]

START = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def topic_shape(topic: int) -> int:
    return topic % len(SHAPES)


def topic_motion(topic: int) -> int:
    return (3 * topic + 1) % len(MOTIONS)


RAW_ITEMS_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("title", pa.string()), ("text", pa.string()),
    ("tags", pa.list_(pa.string())), ("image", pa.binary()), ("video", pa.list_(pa.binary())),
    ("created_at", TS),
])
RAW_EVENTS_SCHEMA = pa.schema([
    ("user_id", pa.string()), ("item_id", pa.string()), ("ts", TS), ("label", pa.int8()),
])
TRUTH_ITEMS_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("topic", pa.int32()), ("shape", pa.string()),
    ("motion", pa.string()), ("colour", pa.string()), ("background", pa.string()),
    ("bias", pa.float32()), ("created_at", TS), ("cold", pa.bool_()),
])
TRUTH_USERS_SCHEMA = pa.schema([
    ("user_id", pa.string()), ("pref", pa.list_(pa.float32())), ("bias", pa.float32()),
    ("activity", pa.float32()),
])
TRUTH_EVENTS_SCHEMA = pa.schema([
    ("user_id", pa.string()), ("item_id", pa.string()), ("ts", TS), ("p_click", pa.float32()),
])


@dataclass
class WorldLatents:
    """The latent structure, drawn up front (cheap even at 1M items / 10M events)."""

    topic: np.ndarray        # (n_items,) int
    shape: np.ndarray        # (n_items,) index into SHAPES
    motion: np.ndarray       # (n_items,) index into MOTIONS
    colour: np.ndarray       # (n_items,) index into COLOUR_NAMES
    background: np.ndarray   # (n_items,) index into BACKGROUNDS
    item_bias: np.ndarray    # (n_items,) float
    created_ms: np.ndarray   # (n_items,) int64 epoch ms
    cold: np.ndarray         # (n_items,) bool
    pref: np.ndarray         # (n_users, n_topics) float
    user_bias: np.ndarray    # (n_users,) float
    activity: np.ndarray     # (n_users,) float
    cutoff_ms: int
    end_ms: int


def item_key(i: int | np.ndarray):
    return np.char.add("i", np.asarray(i).astype(str)) if isinstance(i, np.ndarray) else f"i{i}"


def user_key(u: int | np.ndarray):
    return np.char.add("u", np.asarray(u).astype(str)) if isinstance(u, np.ndarray) else f"u{u}"


def draw_latents(cfg: WorldConfig) -> WorldLatents:
    rng = np.random.default_rng([cfg.seed, 1])
    n, k = cfg.n_items, cfg.n_topics
    topic = rng.integers(0, k, n)
    shape = np.where(rng.random(n) < cfg.shape_fidelity, topic % len(SHAPES),
                     rng.integers(0, len(SHAPES), n))
    motion = np.where(rng.random(n) < cfg.motion_fidelity, (3 * topic + 1) % len(MOTIONS),
                      rng.integers(0, len(MOTIONS), n))
    colour = rng.integers(0, len(COLOURS), n)
    background = rng.integers(0, len(BACKGROUNDS), n)
    item_bias = rng.normal(0, cfg.item_bias_std, n)
    start_ms = int(START.timestamp() * 1000)
    day = 86_400_000
    end_ms = start_ms + cfg.days * day
    cutoff_ms = start_ms + int(cfg.train_share * cfg.days * day)
    cold = rng.random(n) < cfg.cold_share
    # Warm items exist from before the period up to a little before the cut-off.
    warm_created = rng.integers(start_ms - 10 * day, start_ms + (cutoff_ms - start_ms) // 2, n)
    cold_created = rng.integers(cutoff_ms, end_ms - day // 2, n)
    created_ms = np.where(cold, cold_created, warm_created).astype(np.int64)
    pref = rng.dirichlet(np.full(k, cfg.pref_concentration), cfg.n_users)
    user_bias = rng.normal(0, cfg.user_bias_std, cfg.n_users)
    activity = rng.lognormal(0.0, 0.5, cfg.n_users)
    if cfg.drift_ds:
        topic, shape, motion, background, pref = _drift(cfg, created_ms, topic, shape, motion,
                                                        background, pref)
    return WorldLatents(topic, shape, motion, colour, background, item_bias, created_ms, cold,
                        pref, user_bias, activity, cutoff_ms, end_ms)


def day_start_ms(ds: str) -> int:
    """Epoch ms of 00:00 UTC on the ISO date ``ds``."""
    d = dt.date.fromisoformat(ds)
    return int(dt.datetime(d.year, d.month, d.day, tzinfo=dt.timezone.utc).timestamp() * 1000)


def _drift(cfg: WorldConfig, created_ms, topic, shape, motion, background, pref):
    """Items created from ``drift_ds`` on belong to ``drift_topics`` new topics (ids
    ``n_topics`` and up), a new kind of content: each new topic's object is a shape no earlier
    item has (``DRIFT_SHAPES``) with its own motion, over scenes no earlier item has
    (``DRIFT_BACKGROUNDS``); users like a new topic as much as one old topic they are mapped
    to. Drawn from their own generator, so the rest of the world is unchanged."""
    rng = np.random.default_rng([cfg.seed, 20])
    k, m = cfg.n_topics, cfg.drift_topics
    drifted = created_ms >= day_start_ms(cfg.drift_ds)
    new = k + rng.integers(0, m, int(drifted.sum()))
    topic, shape, motion = topic.copy(), shape.copy(), motion.copy()
    background = background.copy()
    topic[drifted] = new
    shape[drifted] = len(SHAPES) + (new - k)
    motion[drifted] = (3 * new + 1) % len(MOTIONS)
    background[drifted] = len(BACKGROUNDS) + rng.integers(0, len(DRIFT_BACKGROUNDS),
                                                           int(drifted.sum()))
    like = rng.permutation(k)[:m]
    return topic, shape, motion, background, np.concatenate([pref, pref[:, like]], axis=1)


def as_of(cfg: WorldConfig, lat: WorldLatents, ds: str) -> tuple[np.ndarray, int]:
    """``world.daily``: the item indices created by the end of ``ds`` and that end (epoch ms):
    the world as it stands that evening."""
    end = day_start_ms(ds) + 86_400_000
    start_ms = int(START.timestamp() * 1000)
    if end <= start_ms:
        raise ValueError(f"world.daily: ds {ds} is before the world's period, which starts on "
                         f"{START.date().isoformat()} and lasts world.days={cfg.days} days")
    return np.flatnonzero(lat.created_ms < end), end


# ----------------------------------------------------------------------------- rendering


def render_item(cfg: WorldConfig, i: int, lat: WorldLatents) -> tuple[bytes, list[bytes], list[str]]:
    """Render item ``i``: (PNG image, PNG video frames, tags)."""
    rng = np.random.default_rng([cfg.seed, 2, i])
    s = cfg.image_size
    shape, colour_name = ALL_SHAPES[lat.shape[i]], COLOUR_NAMES[lat.colour[i]]
    background = ALL_BACKGROUNDS[lat.background[i]]
    img = _bg(background, s, rng)
    draw = ImageDraw.Draw(img)
    shapes_present = {shape}
    for _ in range(rng.integers(0, 3)):  # smaller distractors, random shape and colour
        dshape = SHAPES[rng.integers(len(SHAPES))]
        dcol = COLOUR_NAMES[rng.integers(len(COLOURS))]
        _draw_shape(draw, dshape, rng.uniform(0.15, 0.85) * s, rng.uniform(0.15, 0.85) * s,
                    s * rng.uniform(0.07, 0.12), COLOURS[dcol])
        shapes_present.add(dshape)
    _draw_shape(draw, shape, rng.uniform(0.35, 0.65) * s, rng.uniform(0.35, 0.65) * s,
                s * rng.uniform(0.2, 0.3), COLOURS[colour_name])
    tags = sorted(shapes_present) + [colour_name, background]

    frames: list[bytes] = []
    multi = multi_event_plan(cfg, i, lat)
    if multi is not None:
        mrng = np.random.default_rng([cfg.seed, 13, i])
        frames = [_png(f) for f in render_events(mrng, multi, cfg.video_frames, cfg.video_size,
                                                 background)]
    elif cfg.video_frames > 0:
        v = cfg.video_size
        bg = _bg(background, v, rng)
        dx, dy = MOTION_VEC[MOTIONS[lat.motion[i]]]
        r = v * 0.18
        step = (v - 2 * r) / max(cfg.video_frames, 2) * 0.9
        x0 = v / 2 - dx * step * (cfg.video_frames - 1) / 2
        y0 = v / 2 - dy * step * (cfg.video_frames - 1) / 2
        for f in range(cfg.video_frames):
            frame = bg.copy()
            _draw_shape(ImageDraw.Draw(frame), shape, x0 + dx * step * f, y0 + dy * step * f, r,
                        COLOURS[colour_name])
            frames.append(_png(frame))
    return _png(img), frames, tags


#: Caption kinds of ``caption_variety`` and their shares.
CAPTION_KINDS = {"full": 0.4, "motion": 0.2, "object": 0.2, "scene": 0.2}


def caption(kind: str, colour: str, shape: str, motion: str, background: str) -> str:
    """The caption of an item of the given attributes: ``full`` names all, ``motion`` only the
    motion, ``object`` only the object, ``scene`` only the background."""
    motion = motion.replace("_", " ")
    if kind == "full":
        return f"a {colour} {shape} moves {motion} over {background}"
    if kind == "motion":
        return f"something moves {motion}"
    if kind == "object":
        return f"a {colour} {shape}"
    if kind == "scene":
        return f"a clip over {background}"
    raise ValueError(f"caption kind must be one of {', '.join(CAPTION_KINDS)}, got {kind!r}")


def multi_event_plan(cfg: WorldConfig, i: int, lat: WorldLatents) -> "list[Event] | None":
    """The events of item ``i``'s video when it is a multi-event item (``multi_event_share``),
    else None; the item's own object and motion is one of them."""
    if cfg.multi_event_share <= 0 or cfg.video_frames <= 0:
        return None
    rng = np.random.default_rng([cfg.seed, 12, i])
    if rng.random() >= cfg.multi_event_share:
        return None
    return plan_events(rng, cfg.video_frames, int(rng.integers(2, 4)),
                       fixed=(int(lat.shape[i]), int(lat.motion[i]), int(lat.colour[i])))


def _text(cfg: WorldConfig, i: int, lat: WorldLatents) -> tuple[str, str]:
    rng = np.random.default_rng([cfg.seed, 3, i])
    colour, bg = COLOUR_NAMES[lat.colour[i]], ALL_BACKGROUNDS[lat.background[i]]
    shape, motion = ALL_SHAPES[lat.shape[i]], MOTIONS[lat.motion[i]]
    title = f"{colour.title()} {bg} {TITLE_WORDS[rng.integers(len(TITLE_WORDS))]} {i}"
    if multi_event_plan(cfg, i, lat) is not None:       # the title names the item's event
        title = event_caption(colour, shape, motion)
    kind = "full"
    if cfg.caption_variety:
        kind = str(rng.choice(list(CAPTION_KINDS), p=list(CAPTION_KINDS.values())))
    return title, caption(kind, colour, shape, motion, bg)


# ----------------------------------------------------------------------------- tables


def item_chunks(cfg: WorldConfig, lat: WorldLatents, progress: bool = True,
                items=None) -> Iterator[pa.Table]:
    """Raw item tables (the generic input format, images inline), ``chunk_items`` rows each;
    of the item indices ``items`` (default: every item)."""
    all_ids = np.arange(cfg.n_items) if items is None else np.asarray(items)
    n = len(all_ids)
    bar = tqdm(total=n, desc="world: render items", unit="item", disable=not progress)
    for start in range(0, n, cfg.chunk_items):
        ids = all_ids[start:start + cfg.chunk_items]
        titles, texts, tags, images, videos = [], [], [], [], []
        for i in ids:
            img, frames, tg = render_item(cfg, int(i), lat)
            t, x = _text(cfg, int(i), lat)
            titles.append(t), texts.append(x), tags.append(tg), images.append(img)
            videos.append(frames if frames else None)
        yield pa.Table.from_arrays([
            pa.array(item_key(ids)), pa.array(titles), pa.array(texts),
            pa.array(tags, pa.list_(pa.string())), pa.array(images, pa.binary()),
            pa.array(videos, pa.list_(pa.binary())),
            pa.array(lat.created_ms[ids], pa.int64()).cast(TS),
        ], schema=RAW_ITEMS_SCHEMA)
        bar.update(len(ids))
    bar.close()


def truth_items_table(lat: WorldLatents) -> pa.Table:
    n = len(lat.topic)
    return pa.Table.from_arrays([
        pa.array(item_key(np.arange(n))), pa.array(lat.topic.astype(np.int32)),
        pa.array(np.array(ALL_SHAPES)[lat.shape]), pa.array(np.array(MOTIONS)[lat.motion]),
        pa.array(np.array(COLOUR_NAMES)[lat.colour]),
        pa.array(np.array(ALL_BACKGROUNDS)[lat.background]),
        pa.array(lat.item_bias.astype(np.float32)),
        pa.array(lat.created_ms, pa.int64()).cast(TS), pa.array(lat.cold),
    ], schema=TRUTH_ITEMS_SCHEMA)


def truth_users_table(lat: WorldLatents) -> pa.Table:
    n = len(lat.user_bias)
    k = lat.pref.shape[1]
    pref = pa.FixedSizeListArray.from_arrays(pa.array(lat.pref.astype(np.float32).ravel()), k)
    return pa.Table.from_arrays([
        pa.array(user_key(np.arange(n))), pref.cast(pa.list_(pa.float32())),
        pa.array(lat.user_bias.astype(np.float32)), pa.array(lat.activity.astype(np.float32)),
    ], schema=TRUTH_USERS_SCHEMA)


def simulate_events(cfg: WorldConfig, lat: WorldLatents) -> tuple[pa.Table, pa.Table]:
    """Impressions with click labels (raw events) and their true click probabilities."""
    users, items, ts, p, label = simulate_event_arrays(cfg, lat)
    u_col, i_col = pa.array(user_key(users)), pa.array(item_key(items))
    t_col = pa.array(ts, pa.int64()).cast(TS)
    events = pa.Table.from_arrays([u_col, i_col, t_col, pa.array(label)], schema=RAW_EVENTS_SCHEMA)
    truth = pa.Table.from_arrays([u_col, i_col, t_col, pa.array(p.astype(np.float32))],
                                 schema=TRUTH_EVENTS_SCHEMA)
    return events, truth


def simulate_event_arrays(cfg: WorldConfig, lat: WorldLatents):
    """The click model as arrays: (user index, item index, ts epoch ms, p_click, label int8),
    sorted by user then time."""
    rng = np.random.default_rng([cfg.seed, 4])
    n_users = cfg.n_users
    counts = rng.poisson(cfg.impressions_per_user * lat.activity)
    users = np.repeat(np.arange(n_users), counts)
    m = len(users)
    start_ms = int(START.timestamp() * 1000)
    ts = rng.integers(start_ms, lat.end_ms, m)
    # Items sorted by creation: the items that exist at time t are a prefix of this order.
    order = np.argsort(lat.created_ms, kind="stable")
    created_sorted = lat.created_ms[order]
    n_avail = np.searchsorted(created_sorted, ts, side="right")
    ok = n_avail > 0
    users, ts, n_avail = users[ok], ts[ok], n_avail[ok]
    items = order[(rng.random(len(ts)) * n_avail).astype(np.int64)]
    logit = (cfg.base_logit + cfg.affinity * lat.pref[users, lat.topic[items]]
             + lat.item_bias[items] + lat.user_bias[users])
    p = 1.0 / (1.0 + np.exp(-logit))
    label = (rng.random(len(p)) < p).astype(np.int8)
    srt = np.lexsort((ts, users))
    users, items, ts, p, label = users[srt], items[srt], ts[srt], p[srt], label[srt]
    # Two impressions of one item to one user in the same millisecond would be a duplicate key.
    dup = np.zeros(len(ts), bool)
    dup[1:] = (users[1:] == users[:-1]) & (items[1:] == items[:-1]) & (ts[1:] == ts[:-1])
    keep = ~dup
    return users[keep], items[keep], ts[keep], p[keep], label[keep]


def world_summary(cfg: WorldConfig, lat: WorldLatents, events: pa.Table,
                  items=None) -> WorldFacts:
    """Facts of the world emitted: every item, or the item indices ``items`` (``world.daily``)."""
    labels = events.column("label").to_numpy()
    cold = lat.cold if items is None else lat.cold[items]
    return WorldFacts(
        items=len(cold), users=cfg.n_users, events=events.num_rows,
        ctr=float(labels.mean()) if len(labels) else 0.0, cold_items=int(cold.sum()),
        train_cutoff=dt.datetime.fromtimestamp(lat.cutoff_ms / 1000,
                                               dt.timezone.utc).isoformat())


def truth_in_dense_ids(truth: pd.DataFrame, item_id_map: pd.DataFrame,
                       user_id_map: pd.DataFrame) -> pd.DataFrame:
    """``truth_events`` (external string ids) re-keyed by the dense ids ingest gave: columns
    user_id, item_id (int64), ts, p_click; rows whose ids ingest did not map are dropped."""
    out = truth.copy()
    out["item_id"] = out.item_id.map(dict(zip(item_id_map.external_id, item_id_map.id)))
    out["user_id"] = out.user_id.map(dict(zip(user_id_map.external_id, user_id_map.id)))
    return out.dropna(subset=["item_id", "user_id"]).astype({"item_id": np.int64,
                                                              "user_id": np.int64})


#: Item attributes of the world: the behavioural one, the nuisance ones, the partly revealing one.
ATTRIBUTE_ROLES = {"topic": "behaviour", "colour": "nuisance", "background": "nuisance",
                   "shape": "content"}


def truth_attributes(truth_items: pd.DataFrame, item_id_map: pd.DataFrame,
                     ids: np.ndarray) -> dict[str, np.ndarray]:
    """Each item attribute of :data:`ATTRIBUTE_ROLES` for the dense item ``ids`` (in order)."""
    t = truth_items.merge(item_id_map, left_on="item_id", right_on="external_id")
    t = t.set_index("id").loc[ids]
    return {attr: t[attr].to_numpy() for attr in ATTRIBUTE_ROLES}
