"""Configuration of the Spark jobs and data adapters (plain dataclasses; importing this module
imports neither Spark nor torch).

Choice fields are ``Literal`` types: the configuration loader refuses any other value."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from quantizer.config import RQConfig, VQConfig

PairSource = Literal["swing", "itemcf", "u2i"]


@dataclass
class SparkConfig:
    #: ``local[*]`` on one machine; under ``spark-submit`` the submitted master wins.
    master: str = "local[*]"
    app_name: str = "qarm"
    shuffle_partitions: int = 8
    driver_memory: str = "4g"
    #: Arrow batch size between the JVM and Python workers.
    arrow_batch_size: int = 2000
    #: Extra ``spark.*`` settings passed to the session builder verbatim.
    conf: dict[str, str] = field(default_factory=dict)


@dataclass
class WorldConfig:
    """The synthetic multi-modal world (DESIGN.md §7); see ``pipelines/synthetic.py``."""

    seed: int = 0
    n_items: int = 1500
    n_users: int = 500
    n_topics: int = 8
    #: Impressions per user over the whole period (mean; activity varies per user).
    impressions_per_user: int = 150
    days: int = 30
    #: Share of the period before the training cut-off; items created after it are cold.
    train_share: float = 0.8
    #: Share of items created after the cut-off (cold start).
    cold_share: float = 0.15
    image_size: int = 32
    #: Frames per video; 0 writes no video.
    video_frames: int = 6
    video_size: int = 24
    #: Opt-in caption variety: each item's caption names everything (``full``, 40%) or only the
    #: motion, the object or the scene (20% each), as real captions do; off: every caption is
    #: ``full`` ("a red circle moves left over grass"). See ``pipelines.synthetic.caption``.
    caption_variety: bool = False
    #: Opt-in: the share of items whose video is untrimmed: 2-3 events one after another (each
    #: an object crossing the frame), one of them the item's own object and motion at a random
    #: position, the others random; the item's title names that event ("a red circle moves
    #: left"). The ``ground`` stage finds it (``ground.enabled``) and the video tower can encode
    #: only it (``encoder.video_highlight``). Needs ``video_frames`` >= 9.
    multi_event_share: float = 0.0
    #: Probability that an item's object shape / motion follows its topic (content reveals the
    #: topic only partly).
    shape_fidelity: float = 0.8
    motion_fidelity: float = 0.7
    #: Click model: logit = base + affinity * pref[u, topic] + item/user bias (documented in
    #: ``pipelines/synthetic.py``).
    base_logit: float = -3.0
    affinity: float = 6.0
    #: Dirichlet concentration of users' topic preferences (smaller: fewer favourite topics).
    pref_concentration: float = 0.2
    item_bias_std: float = 0.5
    user_bias_std: float = 0.3
    chunk_items: int = 5000
    #: Opt-in daily increments (for the daily job, ``daily.incremental``): the ``world`` stage of
    #: the run for ``ds`` emits the world as it stands at the end of that day, the items created
    #: by then and the events before then. The period starts on 2026-01-01 and lasts ``days``
    #: days; from the training cut-off on, new (cold) items arrive every day.
    daily: bool = False
    #: Opt-in drift (ISO date): the items created from this day on come from ``drift_topics``
    #: new topics, a new kind of content: shapes and scenes no earlier item has; users like
    #: each new topic as much as one old topic. The daily job's drift measure should refit.
    drift_ds: Optional[str] = None
    drift_topics: int = 2


@dataclass
class SourceConfig:
    """Where raw data comes from: ``synthetic``, ``generic`` files, or ``movielens``."""

    kind: Literal["synthetic", "generic", "movielens"] = "synthetic"
    #: generic: items file (CSV or Parquet) with item_id, title[, text, tags, image, video, created_at]
    items: Optional[str] = None
    #: generic: events file with user_id, item_id, ts[, label | rating]
    events: Optional[str] = None
    #: generic: folder that relative ``image`` / ``video`` paths resolve against
    images_dir: Optional[str] = None
    #: movielens: the ml-latest-small folder and the posters folder
    movielens_dir: str = "../shared/data/ml-latest-small"
    posters_dir: Optional[str] = "../shared/data/ml-posters"
    #: ``label`` column, ``rating`` >= threshold, or implicit (every event positive) when neither.
    rating_threshold: float = 4.0
    #: strftime format of string timestamps; ``None`` accepts ISO-8601 and epoch seconds.
    ts_format: Optional[str] = None
    #: Separator of ``tags`` in CSV files.
    tag_separator: str = "|"
    #: ``auto``: labels from ``label`` or ``rating`` when present; ``implicit``: every event is a
    #: positive whatever columns it has (e.g. MovieLens ratings read as plain interactions).
    feedback: Literal["auto", "implicit"] = "auto"
    #: generic: optional dated item tags (CSV or Parquet: item_id, tag, ts[, user_id]). They
    #: reach an item's text only when dated before the split point of whoever wrote them.
    item_tags: Optional[str] = None


@dataclass
class IngestConfig:
    #: Images larger than this are quarantined (bytes).
    max_image_bytes: int = 20_000_000
    #: Images smaller than this on either side are quarantined (pixels).
    min_image_side: int = 8
    #: Spark partitions of the items table during image validation.
    image_partitions: int = 8


@dataclass
class EmbedConfig:
    #: Spark partitions of the items table during inference.
    partitions: int = 4
    #: torch threads in each Spark task (tasks x threads should not exceed the cores).
    threads_per_task: int = 1


@dataclass
class SplitConfig:
    """How events divide into training, validation and test parts (``pipelines/split.py``).

    Every stage that learns from behaviour (pairs, alignment, examples, training) sees only the
    training part; validation and test events are only ever scored."""

    #: ``global_time``: one time cut for everyone (test = the last ``1 - train_share`` of the
    #: time range or from ``train_end``; validation = the last ``valid_share`` of the training
    #: period). ``per_user``: each user's last ``test_last_n`` positives (and what follows them)
    #: are test, the ``valid_last_n`` before them validation, the rest training; for data whose
    #: timestamps only order each user's sequence.
    #: ``last_days``: the daily job's protocol (test = the last ``test_days`` whole days,
    #: validation the ``valid_days`` before them; ``pipelines/split.py``).
    #: ``auto`` (default): the global time cut when at least ``auto_min_known`` of its test
    #: events come from users the training part has seen, else (or when the cut leaves a part
    #: empty) per_user; the split report says which and why.
    mode: Literal["auto", "global_time", "per_user", "last_days"] = "auto"
    #: auto: the least share of the global cut's test events whose user has training events.
    auto_min_known: float = 0.5
    #: global_time: explicit test start (ISO-8601, UTC); events at or after it are test.
    train_end: Optional[str] = None
    #: global_time: otherwise this share of the events' time range precedes the test part.
    train_share: float = 0.8
    #: global_time: the last share of the period before the test part that is validation.
    valid_share: float = 0.1
    #: per_user: positives per user in the test part, and in the validation part.
    test_last_n: int = 1
    valid_last_n: int = 1
    #: last_days: whole days (UTC) in the test part, and in the validation part before it.
    test_days: int = 1
    valid_days: int = 1


@dataclass
class PairsConfig:
    #: Miners to run.
    sources: list[PairSource] = field(default_factory=lambda: ["swing", "itemcf", "u2i"])
    swing_alpha: float = 1.0
    top_n: int = 20
    min_support: int = 2
    popularity_penalty: float = 0.0
    max_user_items: int = 200
    max_item_users: int = 500
    max_common_items: int = 50
    u2i_window: int = 50
    seed: int = 0
    #: Mine only the last this many days of the training part (a sliding window: the daily
    #: job's pairs follow current behaviour); None mines the whole training part.
    window_days: Optional[int] = None


@dataclass
class QuantizeConfig:
    rq: RQConfig = field(default_factory=RQConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    #: Embeddings the codebooks are fitted on (a seeded Spark sample when there are more).
    fit_sample: int = 200_000
    #: Assign with this existing codebook version instead of fitting (cold-start items).
    codebook: Optional[str] = None
    #: Append a disambiguation level to the RQ code: the rank (0, 1, ...) of an item among the
    #: items sharing its full code, by item id, so every item's code is unique (TIGER-style).
    disambiguate: bool = False
    #: Also fit codes on the raw (unaligned) embeddings: the ``codes_raw`` ablation arm and the
    #: aligned-vs-raw comparison in the report.
    raw_arm: bool = True
    partitions: int = 4
    threads_per_task: int = 1
    #: Items whose exact-search VQ code is compared with the index's (the overlap metric).
    overlap_sample: int = 1000


@dataclass
class ExamplesConfig:
    #: Positives kept in the history sequence (the most recent ones).
    history_len: int = 20
    #: ``auto`` samples negatives only when the events hold no negative label (implicit
    #: feedback); ``always`` / ``never`` force it.
    negatives: Literal["auto", "always", "never"] = "auto"
    #: Sampled negatives per positive.
    neg_ratio: int = 4
    #: Popularity exponent of the negative sampler (0 = uniform, 1 = proportional).
    neg_pop_power: float = 0.75
    #: Attach a copy of the target's raw content embedding (a ``frozen`` column) for users who
    #: export the examples. The ranker's frozen arms do not need it: they look content vectors
    #: up by item id in the embeddings tables.
    frozen_embedding: bool = False
    seed: int = 0
    #: Spark partitions of the per-user work.
    partitions: int = 4
