"""Typed configuration: YAML → dataclasses, with errors that name the bad key.

Every value can be overridden on the command line with ``--set section.key=value`` (the value is
parsed as YAML, so ``--set world.n_items=500`` is an int and ``--set spark.conf={a: b}`` a dict).
Relative paths are resolved against the directory ``qarm`` runs in.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from mm_encoder.item_encoder import ItemEncoderConfig
from mm_encoder.align import AlignConfig
from pipelines.examples import ExamplesConfig
from pipelines.pairs import PairsConfig
from recsys.config import TrainConfig
from quantizer.rq import RQConfig
from quantizer.vq import VQConfig


class ConfigError(ValueError):
    """The configuration has an unknown key, a value of the wrong type, or a bad override."""


@dataclass
class PathsConfig:
    #: Everything the embedded mode writes: snapshots, MLflow store, Spark warehouse, logs.
    root: str = ".qarm"
    #: Where snapshots live; default ``<root>/store``. May be a URI that both pyarrow and Spark
    #: read (``hdfs://...``, ``s3://...``); run state, logs and the embedded MLflow stay in root.
    store: Optional[str] = None


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
class MlflowConfig:
    #: ``None`` means the embedded SQLite store ``<root>/mlflow.db``; set an ``http://`` URI (or
    #: the ``MLFLOW_TRACKING_URI`` environment variable) to use a tracking server.
    tracking_uri: Optional[str] = None
    experiment: str = "qarm"
    enabled: bool = True


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
    """The training / evaluation time split shared by pairs, alignment and the ranker."""

    #: Explicit training end (ISO-8601, UTC); events at or after it are evaluation.
    train_end: Optional[str] = None
    #: Otherwise: this share of the events' time range is training.
    train_share: float = 0.8


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
class QarmConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    encoder: ItemEncoderConfig = field(default_factory=ItemEncoderConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    examples: ExamplesConfig = field(default_factory=ExamplesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """A stable hash of the named sections: the part of the config a stage depends on."""
        d = self.to_dict()
        blob = json.dumps({s: d[s] for s in sections}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def root(self) -> Path:
        return Path(self.paths.root).resolve()

    @property
    def store_uri(self) -> str:
        return self.paths.store or str(self.root / "store")


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> QarmConfig:
    """Read YAML (or nothing, for the defaults), apply ``key=value`` overrides, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p} must hold a mapping of sections, got {type(data).__name__}")
    for item in overrides or []:
        apply_override(data, item)
    return build(QarmConfig, data, "")


def apply_override(data: dict, item: str) -> None:
    """Apply one ``a.b.c=value`` override to a nested dict in place."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}' must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{item}': '{p}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def build(cls, data: Any, prefix: str):
    """Validate ``data`` into dataclass ``cls``; errors name the dotted key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix or 'config'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{_join(prefix, near[0])}'?)" if near else ""
            raise ConfigError(f"unknown key '{_join(prefix, key)}'{hint}; "
                              f"known keys: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        kwargs[name] = _coerce(hints[name], data[name], _join(prefix, name))
    return cls(**kwargs)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _coerce(tp, value, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def dump_yaml(cfg: QarmConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
