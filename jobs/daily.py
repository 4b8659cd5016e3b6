"""The daily job's glue: which arms of today's ``train`` stage warm-start from the previous day's
models, and on which examples; ``qarm backfill`` (days in order).

A day continues the previous day (``daily.incremental``, see ``jobs.stages.drift``). Between
refits, each arm the previous day trained starts from that day's weights (``recsys.train.
warm_start``: grown tables keep their rows) and trains on the examples of the last
``daily.warm_days`` days (1, the default: the day that became training data since the previous
day's split; null: every training example), early-stopped on today's validation part, the
starting weights included. A refit, a changed codebook or a changed model architecture (an arm
whose ``train.model`` now builds another model: :data:`ARCHITECTURE`) trains from scratch on
everything.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from pathlib import Path

log = logging.getLogger(__name__)

#: ModelConfig fields that decide what a trained ranker's weights mean (the others only steer
#: training): a previous model with other values is no start for today's.
ARCHITECTURE = ("dim", "item_hash_size", "user_hash_size", "attention_dim", "cross_layers",
                "cross_rank", "mlp", "dot", "bias", "pred_tags")


def architecture_change(folder: Path, model) -> str:
    """How the ranker trained in ``folder`` (its ``job.json``) differs from ``model`` (a
    ModelConfig) in :data:`ARCHITECTURE`; "" when it does not. A job file from before a key
    existed reads as it was trained (``recsys.job.model_config``)."""
    from recsys.job import TrainJob, model_config

    prev = model_config(TrainJob.load(Path(folder) / "job.json").model)
    return ", ".join(f"{k} {getattr(prev, k)!r} (today {getattr(model, k)!r})"
                     for k in ARCHITECTURE if getattr(prev, k) != getattr(model, k))


def warm_starts(ctx, data, runs: Path) -> dict[str, tuple[object, str]]:
    """arm -> (its TrainingData, restricted to the last ``daily.warm_days`` days when set, and
    the previous model's state dict path) for every arm that warm-starts today; {} when none
    does."""
    from feature_store.facts import DailyPlanFacts, PredictionsFacts, SplitFacts
    from recsys.data import count_rows
    from recsys.runner import save_initial

    io = ctx.io
    if not io.has("daily_plan") or not ctx.cfg.daily.warm_start:
        return {}
    plan = io.facts("daily_plan", DailyPlanFacts)
    prev = io.previous_day("ranker_predictions")
    if plan.refit or prev is None:
        return {}
    pf = prev.facts_of(PredictionsFacts)
    if pf.codebook_version != data.facts.codebook_version:
        log.warning("train: the previous day's rankers read codebook %s, today's codes are %s: "
                    "training from scratch", pf.codebook_version, data.facts.codebook_version)
        return {}
    files = data.train_files
    prev_split = io.previous_day("split_events")
    since = prev_split.facts_of(SplitFacts).valid_start if prev_split is not None else None
    days = ctx.cfg.daily.warm_days
    if since and days is not None:       # the last `days` days of the training part
        since = (dt.datetime.fromisoformat(since) - dt.timedelta(days=days - 1)).isoformat()
        files = new_examples(data.train_files, since, runs / "new_training_examples.parquet")
        if count_rows(files) < ctx.cfg.train.batch_size:
            log.warning("train: fewer new training examples since %s than one global batch; "
                        "warm-starting on every training example", since)
            files = data.train_files
    out = {}
    for arm in ctx.cfg.train.arms:
        folder = pf.models.get(arm)
        if not folder or not (Path(folder) / "model" / "meta.json").exists():
            log.info("train: %s has no finished model of the previous day: from scratch", arm)
            continue
        changed = architecture_change(Path(folder), ctx.cfg.train.for_arm(arm).model)
        if changed:
            log.warning("train: %s's previous model was built with %s: from scratch", arm,
                        changed)
            continue
        init = save_initial(Path(folder), runs / f"init_{arm.replace('+', '_')}.pt")
        out[arm] = (dataclasses.replace(data, train_files=files), init)
    return out


def retriever_warm_starts(ctx, codebook_version: str, work: Path) -> dict[str, str]:
    """tower -> the previous day's trained tower as a state dict, for every tower that
    warm-starts today (no refit, the same codebook, a finished model); {} otherwise. A
    warm-started tower trains on every training sequence from those weights, early-stopped on
    today's validation part."""
    from feature_store.facts import CandidatesFacts, DailyPlanFacts
    from recsys.retrieval_train import save_initial

    io = ctx.io
    if not io.has("daily_plan") or not ctx.cfg.daily.warm_start:
        return {}
    prev = io.previous_day("candidates")
    if io.facts("daily_plan", DailyPlanFacts).refit or prev is None:
        return {}
    pf = prev.facts_of(CandidatesFacts)
    if pf.codebook_version != codebook_version:
        return {}
    out = {}
    for name in ctx.cfg.retrieval.towers:
        folder = pf.models.get(name)
        if folder and (Path(folder) / "model").exists():
            out[name] = save_initial(folder, work / f"init_{name.replace('+', '_')}.pt")
    return out


def new_examples(files: list[str], since: str, path: Path) -> list[str]:
    """The examples of ``files`` at or after ``since`` (ISO-8601), in their order, as one file."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    cut = dt.datetime.fromisoformat(since)
    parts = []
    for f in files:
        t = pq.read_table(f)
        ts = t.column("ts")
        parts.append(t.filter(pc.greater_equal(ts, pa.scalar(cut, ts.type))))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.concat_tables(parts), tmp)
    tmp.replace(path)
    return [str(path)]


def days(first: str, last: str) -> list[str]:
    """Every ISO date from ``first`` to ``last``, both included."""
    a, b = dt.date.fromisoformat(first), dt.date.fromisoformat(last)
    if b < a:
        raise ValueError(f"--to {last} is before --from {first}")
    return [(a + dt.timedelta(d)).isoformat() for d in range((b - a).days + 1)]
