"""The facts a stage hands on with a snapshot: one typed record per kind of table.

A manifest carries its snapshot's facts (the embedding dimension, the codebook version, the
training end of the split, ...), so that a downstream stage never recomputes or guesses them.
Each table kind has one dataclass here; a writer must pass an instance of its table's class, and
a reader gets the record back validated (unknown keys, wrong types and missing fields raise
:class:`FactsError`). Tables not listed carry no facts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

from feature_store.typed import from_dict


class FactsError(ValueError):
    """A snapshot's facts are missing, of the wrong kind, or do not validate."""


@dataclass(frozen=True)
class WorldFacts:
    """The synthetic world's raw and ground-truth tables."""

    items: int
    users: int
    events: int
    ctr: float
    cold_items: int
    #: The world's training cut-off (ISO-8601, UTC): items created after it are cold.
    train_cutoff: str


@dataclass(frozen=True)
class ItemsFacts:
    #: Raw item rows read (rows out + quarantined).
    rows_in: int


@dataclass(frozen=True)
class EventsFacts:
    rows_in: int
    #: Where the label came from: a ``label`` column, ``rating`` >= threshold, or ``implicit``.
    label_mode: Literal["label", "rating", "implicit"]


@dataclass(frozen=True)
class SplitFacts:
    """How the events were split (``pipelines/split.py``)."""

    mode: Literal["global_time", "per_user", "last_days"]
    #: global_time: start of the test part and of the validation part (ISO-8601, UTC).
    test_start: Optional[str]
    valid_start: Optional[str]
    #: Events, positives and distinct users per part (train, valid, test).
    rows: dict[str, int]
    positives: dict[str, int]
    users: dict[str, int]
    #: Users with test events that also have training events (known) and that do not (new).
    test_users_known: int
    test_users_new: int
    #: per_user: users with too few positives to be split (all their events are training).
    users_too_short: int
    #: split.mode auto: which mode it chose and why (None when the mode was configured).
    auto: Optional[str] = None
    #: Test events whose user has training events (None in manifests written before it).
    test_events_known: Optional[int] = None


@dataclass(frozen=True)
class EmbeddingFacts:
    dim: int
    encoder_version: str
    #: Folder of the encoder artifact that produced the embeddings.
    encoder_artifact: str
    #: Aligned embeddings: the raw encoder they were aligned from, and the pairs trained on.
    raw_encoder_version: Optional[str] = None
    pairs_snapshot: Optional[str] = None


@dataclass(frozen=True)
class FeatureFacts:
    """Frozen tower features, modalities concatenated in ``dims`` order."""

    dims: dict[str, int]
    encoder_version: str


@dataclass(frozen=True)
class PairsFacts:
    #: The split whose training part the pairs were mined from.
    split_mode: str


@dataclass(frozen=True)
class CodesFacts:
    codebook_version: str
    #: RQ levels of the ``rq`` column (including a disambiguation level).
    levels: int
    #: Whether the codebook was fitted by this run (False: an existing one, assign-only).
    fitted: bool
    #: The embeddings snapshot that was coded, and the encoder version that produced it.
    embeddings: str
    encoder_version: str
    disambiguated: bool = False


@dataclass(frozen=True)
class ExamplesFacts:
    implicit_negatives: bool
    levels: int
    #: Rows of the per-item lookups (max item id + 1).
    n_items: int
    n_users: int
    split_mode: str
    history_len: int
    #: The ``*_raw`` code columns are filled (the codes_raw arm can train).
    raw_codes: bool
    #: The ``frozen`` column is filled, from ``frozen_embeddings`` of width ``frozen_dim``.
    frozen: bool
    frozen_dim: int
    frozen_embeddings: Optional[str]
    codes_per_level: int
    mean_history: float
    mean_vq: float
    codebook_version: str
    encoder_version: str
    #: The tags of the ``pred_tags`` column (index -> tag; empty: no tagger ran, the column is
    #: empty) and the mean number per example.
    pred_tag_vocab: tuple[str, ...] = ()
    mean_pred_tags: float = 0.0


@dataclass(frozen=True)
class PredictionsFacts:
    arms: tuple[str, ...]
    ranks: int
    codebook_version: str
    encoder_version: str
    #: Baselines scored beside the arms (popularity, mf).
    baselines: tuple[str, ...] = ()
    #: Click rate of the training part (NE against it is reported).
    train_rate: float = float("nan")
    #: Each arm's training folder (job.json + model/), where a daily run warm-starts from.
    models: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Arms that warm-started from the previous day's model (daily runs).
    warm_started: tuple[str, ...] = ()


@dataclass(frozen=True)
class CandidatesFacts:
    #: The tower that wrote the candidates, its registered version ("" if not registered).
    retriever: str
    retriever_version: str
    codebook_version: str
    index: str
    top_k: int
    users: int
    #: Each tower's training folder (the first seed's), where a daily run warm-starts from.
    models: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Towers that warm-started from the previous day's (daily runs).
    warm_started: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaggerFacts:
    #: The tagger's content version ("" when no tagger was trained), its backbone and folder.
    version: str
    backbone: str
    folder: str
    tags: int
    holdout_map: float
    baseline_map: float
    n_train: int
    n_holdout: int


@dataclass(frozen=True)
class VideoTextFacts:
    #: The video-text model's content version ("" when none was trained: no item has a video
    #: and a caption), its kind, loss and folder, and the image tower its frames went through.
    version: str
    model: str
    loss: str
    folder: str
    image_tower: str
    dim: int
    n_train: int
    n_holdout: int
    #: Held-out text->video R@1, R@5, median rank; with DSL re-ranking R@1; video->text R@1.
    t2v_r1: float
    t2v_r5: float
    t2v_mdr: float
    t2v_dsl_r1: float
    v2t_r1: float


@dataclass(frozen=True)
class GroundingFacts:
    """The GMU model the ``ground`` stage trained and applied, and its held-out figures."""
    version: str
    folder: str
    data: str
    n_train: int
    n_holdout: int
    #: Held-out R@1 at IoU 0.5 and 0.7 and mIoU (percent), and the trivial baseline's.
    r1_05: float
    r1_07: float
    miou: float
    trivial_r1_05: float
    trivial_miou: float
    #: Items given a highlight.
    items: int


@dataclass(frozen=True)
class DailyPlanFacts:
    """What a daily run decided before aligning (``daily_plan``): refit the alignment and the
    codebook, or code the new items with the previous day's, and warm-start the rankers."""

    refit: bool
    #: Why: ``first day``, ``--refit``, ``drift: ...`` or ``no drift: ...``.
    reason: str
    new_items: int
    #: The previous day's aligned encoder (folder, version) and codebook, kept when not
    #: refitting ("" on a first day).
    encoder_artifact: str = ""
    encoder_version: str = ""
    codebook_version: str = ""
    #: The pairs snapshot the kept encoder was aligned on (lineage).
    encoder_pairs: str = ""
    previous_ds: str = ""
    error_ratio: float = 1.0
    error_ratio_null: float = 0.0
    tv: float = 0.0
    tv_null: float = 0.0


#: The facts kind of each table that has one.
TABLE_FACTS: dict[str, type] = {
    **{t: WorldFacts for t in ("raw_items", "raw_events", "truth_items", "truth_users",
                               "truth_events")},
    "items": ItemsFacts,
    "events": EventsFacts,
    "split_events": SplitFacts,
    "item_embeddings": EmbeddingFacts,
    "aligned_item_embeddings": EmbeddingFacts,
    "item_features": FeatureFacts,
    "aligned_item_features": FeatureFacts,
    "item_pairs": PairsFacts,
    "item_codes": CodesFacts,
    "item_codes_raw": CodesFacts,
    "train_examples": ExamplesFacts,
    "valid_examples": ExamplesFacts,
    "eval_examples": ExamplesFacts,
    "ranker_predictions": PredictionsFacts,
    "candidates": CandidatesFacts,
    "item_pred_tags": TaggerFacts,
    "item_video_embeddings": VideoTextFacts,
    "item_highlights": GroundingFacts,
    "daily_plan": DailyPlanFacts,
}


def check_facts(table: str, facts) -> None:
    """Raise :class:`FactsError` unless ``facts`` is the kind ``table`` carries (None if none)."""
    want = TABLE_FACTS.get(table)
    if want is None:
        if facts is not None:
            raise FactsError(f"{table} carries no facts, got {type(facts).__name__}")
        return
    if not isinstance(facts, want):
        raise FactsError(f"{table} needs {want.__name__} facts, got {type(facts).__name__}")


def facts_to_dict(facts) -> Optional[dict]:
    return None if facts is None else dataclasses.asdict(facts)


def facts_from_dict(table: str, data: Optional[dict]):
    """The typed facts of ``table`` from a manifest's JSON (None for a table without facts)."""
    want = TABLE_FACTS.get(table)
    if want is None:
        return None
    if data is None:
        raise FactsError(f"the manifest of a {table} snapshot has no facts: it was written by an "
                         "older qarm; re-run the stage that produces it (qarm run --force)")
    return from_dict(want, data, FactsError, f"{table} facts")
