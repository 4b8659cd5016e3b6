"""A training job: everything a rank needs, as JSON (``job.json`` in the arm's output folder),
written by the driver (``recsys.runner``) and read by every rank (``recsys.train``)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


class TrainError(RuntimeError):
    """A rank failed; the message carries the tail of its log."""


@dataclass
class TrainJob:
    """Everything a rank needs, as JSON (``job.json`` in the output folder)."""

    arm: str
    spec: dict
    model: dict
    train_files: list[str]
    eval_files: list[str]
    out_dir: str
    micro_batch: int
    epochs: int
    max_steps: int
    sparse_lr: float
    dense_lr: float
    seed: int
    checkpoint_every: int
    device: str = "cpu"
    threads: int = 1
    timeout_s: int = 600
    #: .npy of the frozen content vectors by item id (frozen arms), else "".
    frozen_table: str = ""
    #: Decoupled weight decay of the dense parameters (AdamW).
    dense_weight_decay: float = 0.0
    #: Fused optimizer of the embedding tables: ``rowwise_adagrad`` or ``adagrad``.
    sparse_optimizer: str = "rowwise_adagrad"
    #: Validation examples for early stopping ([] = train all epochs, no early stopping).
    valid_files: list[str] = dataclasses.field(default_factory=list)
    #: Validate every N global steps (0 = once per epoch).
    valid_every: int = 0
    #: Stop after this many validations without improvement; keep the best weights.
    patience: int = 2
    #: ``auc`` (higher is better) or ``logloss`` (lower is better) on the validation files.
    valid_metric: str = "auc"
    #: Profile this many steps (after warm-up) with torch.profiler into profile.txt (0 = off).
    profile_steps: int = 0
    #: Ranks the driver launches (``micro_batch * world`` is the global batch).
    world: int = 1
    #: Warm start: a ``.pt`` state dict of a trained ranker of the same arm (the daily job's
    #: previous day) that the initial weights come from instead of the seeded initialisation;
    #: tables that have grown since (new items or users) keep its rows and initialise the rest.
    init_from: str = ""
    #: Polyak averaging: validation, early stopping and the saved model use an exponential
    #: moving average of the weights with this decay per step (0 = the last weights, as jobs
    #: written before it existed).
    average: float = 0.0

    def resume_key(self) -> dict:
        """What must match for a run to resume another's checkpoints: everything but the
        number of ranks (a checkpoint of N ranks resumes on M), with the global batch in place
        of the per-rank one (the global batches are the same on any number of ranks)."""
        d = dataclasses.asdict(self)
        d["global_batch"] = d.pop("micro_batch") * d.pop("world")
        return json.loads(json.dumps(d))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "TrainJob":
        return cls(**json.loads(Path(path).read_text()))


def spec_from_dict(d: dict):
    from recsys.features import FeatureSpec, SparseFeature, Table

    return FeatureSpec(
        arm=d["arm"], dim=d["dim"], history_len=d["history_len"], levels=d["levels"],
        tables=tuple(Table(**{**t, "features": tuple(t["features"]),
                              "ids_per_example": tuple(t["ids_per_example"])})
                     for t in d["tables"]),
        sparse=tuple(SparseFeature(**f) for f in d["sparse"]),
        frozen_rows=d["frozen_rows"], frozen_dim=d["frozen_dim"],
        frozen_source=d["frozen_source"], frozen_slots=d["frozen_slots"],
        match_thresholds=tuple(d["match_thresholds"]),
        pred_tag_vocab=tuple(d.get("pred_tag_vocab", ())), dedup_ids=d.get("dedup_ids", True))


#: ModelConfig keys that came after models were saved without them, each with the value that
#: rebuilds those older models (the default of a new run may differ: ``bias`` is on since).
ADDED_MODEL_KEYS = {"bias": False, "detach_history": False}


def model_config(d: dict):
    """The ModelConfig of a job file or a saved model; keys it predates read as they were."""
    from recsys.config import ModelConfig

    return ModelConfig(**{**ADDED_MODEL_KEYS, **d})
