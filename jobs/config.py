"""The configuration the CLI assembles: one section per package's own config dataclass.

Each package owns its configuration (``pipelines/config.py``, ``mm_encoder/config.py``,
``quantizer/config.py``, ``recsys/config.py``); this module only puts the sections together,
reads YAML and ``--set`` overrides, and validates them (unknown keys, types, ``Literal`` choices)
when the config loads, with errors that name the dotted key.

Every value can be overridden on the command line with ``--set section.key=value`` (the value is
parsed as YAML, so ``--set world.n_items=500`` is an int and ``--set spark.conf={a: b}`` a dict).
Relative paths are resolved against the directory ``qarm`` runs in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from feature_store.typed import from_dict
from mm_encoder.config import AlignConfig, GroundingConfig, ItemEncoderConfig, PretrainConfig
from pipelines.config import (EmbedConfig, ExamplesConfig, IngestConfig, PairsConfig,
                              QuantizeConfig, SourceConfig, SparkConfig, SplitConfig,
                              WorldConfig)
from feature_store.online import OnlineConfig
from recsys.config import AblationConfig, RetrievalConfig, ServeConfig, TrainConfig


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
class MlflowConfig:
    #: ``None`` means the embedded SQLite store ``<root>/mlflow.db``; set an ``http://`` URI (or
    #: the ``MLFLOW_TRACKING_URI`` environment variable) to use a tracking server.
    tracking_uri: Optional[str] = None
    experiment: str = "qarm"
    enabled: bool = True


@dataclass
class RegistryConfig:
    """The promotion gate (``promote`` stage, ``jobs/registry.py``)."""
    #: The production arm: its ranker version becomes the ``challenger`` and goes through the
    #: gate (an arm trained on the aligned codes, whose encoder and codebook are registered).
    arm: Literal["codes", "codes+frozen"] = "codes"
    #: Paired bootstrap over users of the test AUC difference: resamples and interval level.
    bootstrap: int = 1000
    level: float = 0.95
    seed: int = 0


@dataclass
class DailyConfig:
    """The daily job (``qarm run --ds D`` once a day, ``qarm backfill``): see ``jobs/daily.py``.

    Off (the default), every run rebuilds everything from its inputs. On, a day continues the
    previous day's run (the latest earlier ``ds`` whose stages succeeded): unchanged items (by
    content hash) keep their embeddings, new items are embedded and coded with the current
    aligned encoder and codebook, and the production arm warm-starts from the previous day's
    ranker. The encoder's alignment and the codebook are refitted together only when the new
    items drift (or on ``refit``); a refit retrains the ranker from scratch."""

    incremental: bool = False
    #: Refit the alignment and the codebook today whatever the drift (``qarm run --refit``).
    refit: bool = False
    #: Refit when the new items' mean RQ reconstruction error, over what unseen items like the
    #: already-coded ones get, exceeds this ratio (and chance: ``quantizer.metrics.drift``).
    drift_threshold: float = 1.15
    #: ... or when the new items' level-1 code distribution is this far (total variation) from
    #: the already-coded items' (0 to 1; and beyond chance).
    utilization_threshold: float = 0.3
    #: Fewer new items than this never trigger a refit (the measures are noise on a handful).
    min_new_items: int = 20
    #: Between refits, start the rankers and retrievers from the previous day's weights
    #: (false: train them from scratch every day, on every training example).
    warm_start: bool = True
    #: A warm-started ranker trains on the training examples of the last this many days (1:
    #: only the day that became training data since the previous run), or on every training
    #: example when null. The previous day's weights are validated first and kept when
    #: training does not beat them. Measured on the synthetic world (README, "The daily job"):
    #: both are within noise of a retrain from scratch; one day trains 5-6x faster.
    warm_days: Optional[int] = 1


@dataclass
class QarmConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    ground: GroundingConfig = field(default_factory=GroundingConfig)
    encoder: ItemEncoderConfig = field(default_factory=ItemEncoderConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    examples: ExamplesConfig = field(default_factory=ExamplesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    daily: DailyConfig = field(default_factory=DailyConfig)

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
    return check_consistent(from_dict(QarmConfig, data, ConfigError))


def check_consistent(cfg: QarmConfig) -> QarmConfig:
    """Settings that name each other: a tower the ``pretrain`` stage trains needs the stage."""
    e, p = cfg.encoder, cfg.pretrain
    if e.image_tower == "tagger" and not e.tagger_path and not p.enabled:
        raise ConfigError("encoder.image_tower=tagger needs the tagger of the pretrain stage: "
                          "set pretrain.enabled=true (or encoder.tagger_path to a saved one)")
    if (e.video and e.video_tower == "camoe" and not e.camoe_path
            and not (p.enabled and p.video.enabled)):
        raise ConfigError("encoder.video_tower=camoe needs the video-text model of the pretrain "
                          "stage: set pretrain.enabled=true and pretrain.video.enabled=true (or "
                          "encoder.camoe_path to a saved one)")
    if e.video_highlight and not cfg.ground.enabled:
        raise ConfigError("encoder.video_highlight encodes the moment the ground stage finds: "
                          "set ground.enabled=true")
    g = cfg.ground
    if not (g.moment or g.clip):
        raise ConfigError("ground needs ground.moment or ground.clip (or both)")
    if g.data == "charades" and not (g.charades_annotations and g.charades_features
                                     and g.charades_durations):
        raise ConfigError("ground.data=charades needs ground.charades_annotations, "
                          "ground.charades_features and ground.charades_durations")
    if cfg.world.multi_event_share > 0 and cfg.world.video_frames < 9:
        raise ConfigError(f"world.multi_event_share needs world.video_frames >= 9 (2-3 events "
                          f"of at least 3 frames), got {cfg.world.video_frames}")
    if cfg.online.keep_positives < cfg.examples.history_len:
        raise ConfigError(f"online.keep_positives ({cfg.online.keep_positives}) is below "
                          f"examples.history_len ({cfg.examples.history_len}): the service "
                          "would score with shorter histories than the ranker trained on")
    for key, value in (("train.parallel_arms", cfg.train.parallel_arms),
                       ("retrieval.parallel_towers", cfg.retrieval.parallel_towers)):
        if value < 0:
            raise ConfigError(f"{key} must be 0 (as many as the cores hold) or positive, "
                              f"got {value}")
    for key, value in (("train.ranks", cfg.train.ranks),
                       ("train.threads_per_rank", cfg.train.threads_per_rank),
                       ("retrieval.ranks", cfg.retrieval.ranks),
                       ("retrieval.threads_per_rank", cfg.retrieval.threads_per_rank)):
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    if not 0.0 <= cfg.split.auto_min_known <= 1.0:
        raise ConfigError(f"split.auto_min_known is a share of test events, between 0 and 1; "
                          f"got {cfg.split.auto_min_known}")
    if cfg.pairs.window_days is not None and cfg.pairs.window_days < 1:
        raise ConfigError(f"pairs.window_days must be >= 1 (or null: the whole training part), "
                          f"got {cfg.pairs.window_days}")
    if cfg.daily.warm_days is not None and cfg.daily.warm_days < 1:
        raise ConfigError(f"daily.warm_days must be >= 1 (or null: every training example), "
                          f"got {cfg.daily.warm_days}")
    if cfg.daily.refit and not cfg.daily.incremental:
        raise ConfigError("--refit (daily.refit) is for daily runs that continue the previous "
                          "day: set daily.incremental=true (every other run refits anyway)")
    if cfg.daily.incremental and cfg.align.tune_text_layers:
        raise ConfigError("daily.incremental keeps the previous day's aligned encoder between "
                          "refits, which align.tune_text_layers (a tuned text tower) does not "
                          "support yet: set align.tune_text_layers=0")
    w = cfg.world
    if w.drift_ds is not None:
        import datetime as dt

        from pipelines.drawing import DRIFT_SHAPES

        try:
            dt.date.fromisoformat(w.drift_ds)
        except ValueError:
            raise ConfigError(f"world.drift_ds must be an ISO date (YYYY-MM-DD), got "
                              f"{w.drift_ds!r}") from None
        if not 1 <= w.drift_topics <= len(DRIFT_SHAPES):
            raise ConfigError(f"world.drift_topics must be 1..{len(DRIFT_SHAPES)} (one new "
                              f"shape each), got {w.drift_topics}")
    return cfg


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


def dump_yaml(cfg: QarmConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
