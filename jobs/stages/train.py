"""``train``: train the TorchRec ranker for every ablation arm on the training part (sharded,
fused optimizers, local ranks or torchrun), early-stopped on the validation part, score the
validation and test examples, score the baselines (popularity, logistic MF) beside them, and
register each arm in MLflow. ``qarm ablation`` reuses the helpers here for its grid and seeds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jobs.report import text_table
from jobs.stage import Stage, StageContext, StageIO, StageReport

#: The embeddings table each frozen-content source reads.
FROZEN_TABLES = {"raw": "item_embeddings", "aligned": "aligned_item_embeddings"}


def frozen_sources(cfg) -> list[str]:
    from recsys.features import FROZEN_SOURCE

    return sorted({FROZEN_SOURCE[a] for a in cfg.train.arms if a in FROZEN_SOURCE})


def inputs(cfg) -> tuple[str, ...]:
    # The frozen arms look the content vectors up by item id in the embeddings tables.
    return ("train_examples", "valid_examples", "eval_examples") + tuple(
        FROZEN_TABLES[s] for s in frozen_sources(cfg)) + (
        ("daily_plan", "split_events") if cfg.daily.incremental else ())


@dataclass
class TrainingData:
    """What every arm's training reads: the examples' files and facts and, per frozen source,
    the content table (``.npy`` by item id), its width and similarity thresholds."""
    facts: object
    train_files: list[str]
    valid_files: list[str]
    eval_files: list[str]
    train_rate: float
    frozen: dict[str, tuple[str, int, tuple[float, ...]]]
    examples_ref: str


def training_data(io: StageIO, cfg, work: Path) -> TrainingData:
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from feature_store.arrays import ids_and_matrix
    from feature_store.facts import ExamplesFacts
    from recsys.features import match_thresholds
    from recsys.runner import write_frozen_table

    facts = io.facts("train_examples", ExamplesFacts)
    frozen = {}
    for source in frozen_sources(cfg):
        table = FROZEN_TABLES[source]
        m = io.manifest(table)
        ids, vecs = ids_and_matrix(io.arrow(table), "embedding")
        path = write_frozen_table(ids, vecs, facts.n_items,
                                  work / f"frozen_{source}_{m.snapshot_id}.npy")
        frozen[source] = (path, int(vecs.shape[1]),
                          match_thresholds(np.load(path), max(facts.codes_per_level, 2)))
    train_files = io.files("train_examples")
    labels = [pq.read_table(f, columns=["label"]).column("label") for f in train_files]
    n = sum(len(c) for c in labels)
    rate = sum(pc.sum(c).as_py() or 0 for c in labels) / max(n, 1)
    return TrainingData(facts, train_files, io.files("valid_examples"),
                        io.files("eval_examples"), float(rate), frozen,
                        io.manifest("train_examples").ref)


def train_one(data: TrainingData, arm: str, tcfg, out_dir: Path, quiet: bool = False,
              init_from: str = ""):
    """Train one arm (``tcfg``: the train config with this arm's settings and seed), from the
    seeded initialisation or warm-started from ``init_from`` (a state dict)."""
    from recsys.features import FROZEN_SOURCE, spec_for_examples
    from recsys.runner import train_arm

    path, dim, thresholds = data.frozen.get(FROZEN_SOURCE.get(arm, ""), ("", 0, ()))
    spec = spec_for_examples(arm, tcfg.model, data.facts, dim, thresholds)
    return train_arm(spec, tcfg, data.train_files, data.eval_files, out_dir, quiet=quiet,
                     frozen_table=path, valid_files=data.valid_files, init_from=init_from)


def arm_workers(t) -> int:
    """How many arms train at once (``train.parallel_arms``; 0: as many as the cores hold)."""
    from recsys.launch import concurrent_runs

    return concurrent_runs(t.parallel_arms, t.ranks, t.threads_per_rank, t.device, t.launcher)


def train_arms(arms: list[str], fit, workers: int, progress: bool) -> list:
    """``fit`` over ``arms``, ``workers`` at once, results in order. With more than one at once
    the ranks' own bars are off (they would interleave) and one bar counts the finished arms."""
    from tqdm.auto import tqdm

    from recsys.launch import run_concurrently

    with tqdm(total=len(arms), desc=f"train arms ({workers} at once)", unit="arm",
              disable=not progress or workers <= 1) as bar:
        return run_concurrently(fit, arms, workers, done=lambda: bar.update(1))


def with_seed(table, seed: int):
    import pyarrow as pa

    return table.append_column("seed", pa.array([seed] * table.num_rows, pa.int32()))


def predictions_table(tables: list):
    """Arms' and baselines' predictions as one table of the predictions schema (the arms' come
    from examples files, whose fields are non-null; the baselines' from pandas)."""
    import pyarrow as pa

    from feature_store.schemas import conform, predictions_schema

    schema = predictions_schema()
    return pa.concat_tables([conform(t, schema, "ranker_predictions") for t in tables])


def run_baselines(data: TrainingData, cfg, seed: int):
    """(predictions, info per baseline) of the configured baselines."""
    from recsys.baselines import baseline_predictions

    out, info = [], {}
    for name in cfg.train.baselines:
        t, i = baseline_predictions(name, data.train_files, data.valid_files, data.eval_files,
                                    cfg.train.mf, seed)
        out.append(with_seed(t, seed))
        info[name] = i
    return out, info


@dataclass
class TrainReport(StageReport):
    #: One row per arm: arm, steps, best step, valid AUC, final loss, examples/s, version.
    arms: list[dict]
    setup: str

    def text(self) -> str:
        return text_table([("arm", "s"), ("steps", "d"), ("best step", "d"),
                           ("valid AUC", ".4f"), ("final loss", ".4f"), ("examples/s", ".0f"),
                           ("registered", "s")],
                          [(a["arm"], a["steps"], a["best_step"], a["valid_auc"],
                            a["final_loss"], a["examples_per_s"],
                            f"qarm-ranker v{a['version']}" if a["version"] else "-")
                           for a in self.arms]) + "\n" + self.setup

    def metrics(self) -> dict[str, float]:
        return {f"{a['arm']}.{k}": a[k] for a in self.arms
                for k in ("final_loss", "steps", "best_step", "valid_auc", "examples_per_s")}


def arm_row(arm: str, res, version=None) -> dict:
    curve = res.result["loss_curve"]
    return {"arm": arm, "steps": res.result["steps"], "best_step": res.result["best_step"],
            # The best validation metric (AUC unless train.valid_metric says logloss).
            "valid_auc": res.result["best_valid"] if res.result["best_valid"] is not None
            else float("nan"),
            "final_loss": float(sum(curve[-20:]) / len(curve[-20:])) if curve
            else float("nan"),
            "examples_per_s": res.result["examples_per_second"], "version": version}


def run(ctx: StageContext) -> TrainReport:
    from feature_store import schemas
    from feature_store.facts import PredictionsFacts

    from jobs.daily import warm_starts

    io, t = ctx.io, ctx.cfg.train
    runs = ctx.run_dir("train")
    data = training_data(io, ctx.cfg, runs)
    facts = data.facts
    preds, rows, models = [], [], {}
    # A daily run without a refit: arms the previous day trained continue from its models on
    # the day that just became training data.
    warm = warm_starts(ctx, data, runs)
    workers = arm_workers(t)

    def fit(arm: str):
        arm_data, init = warm.get(arm, (data, ""))
        return train_one(arm_data, arm, t.for_arm(arm), runs / arm.replace("+", "_"),
                         init_from=init, quiet=not ctx.progress or workers > 1)
    fitted = train_arms(t.arms, fit, workers, ctx.progress)
    for arm, res in zip(t.arms, fitted):
        models[arm] = str(res.out_dir)
        curve = res.result["loss_curve"]
        ctx.tracker.series(f"{arm}.train_loss", [
            (step, curve[step]) for step in range(0, len(curve), max(1, len(curve) // 200))])
        ctx.tracker.series(f"{arm}.valid_{res.result['valid_metric']}",
                           res.result["valid_curve"])
        version = None
        if t.register:
            version = register_ranker(ctx, arm, res, facts, data.examples_ref)
        preds.append(with_seed(res.predictions, t.seed))
        rows.append(arm_row(arm, res, version))
    base, _ = run_baselines(data, ctx.cfg, t.seed)
    preds += base
    out = io.write_arrow("ranker_predictions", predictions_table(preds),
                         schema=schemas.predictions_schema(),
                         facts=PredictionsFacts(tuple(t.arms), t.ranks, facts.codebook_version,
                                                facts.encoder_version,
                                                tuple(t.baselines), data.train_rate, models,
                                                tuple(warm)))
    started = (f"warm-started from the previous day: {', '.join(warm)} (on "
               f"{sum(pq_rows(d.train_files) for d, _ in warm.values()) // max(len(warm), 1)} "
               "training examples); " if warm else "")
    setup = (f"{started}ranks: {t.ranks} ({t.launcher}, {t.device}), {workers} arm(s) at once; "
             f"global batch {t.batch_size}; "
             f"at most {t.epochs} epochs, early stopping on validation {t.valid_metric} "
             f"(patience {t.patience}); seed {t.seed}; baselines: "
             f"{', '.join(t.baselines) or 'none'}; runs in {runs}")
    return TrainReport({"ranker_predictions": out}, rows, setup)


def pq_rows(files: list[str]) -> int:
    from recsys.data import count_rows

    return count_rows(files)


def register_ranker(ctx: StageContext, arm: str, res, facts, examples_ref: str):
    """Register the arm's trained ranker (weights.safetensors + ranker.json) with the versions
    it was built from (the promote stage makes the production arm's version the challenger)."""
    from jobs.registry import CODEBOOK, ENCODER, RANKER, Registry
    from recsys.job import TrainJob, model_config
    from recsys.runner import load_trained
    from recsys.saved import save_ranker

    if not ctx.cfg.mlflow.enabled:
        return None
    folder = save_ranker(load_trained(res.out_dir),
                         model_config(TrainJob.load(res.out_dir / "job.json").model),
                         res.out_dir / "registered", arm=arm)
    reg = Registry(ctx.cfg)
    tags = {"arm": arm, "examples": examples_ref, "world_size": res.result["world"],
            **{f"setting.{k}": str(v) for k, v in ctx.cfg.train.tuned.get(arm, {}).items()}}
    # Lineage only where the arm reads them: the aligned codes (codebook and encoder), or the
    # aligned embedding (encoder). The raw encoder and the raw codes' codebook are not gated.
    parents = {"codes": (CODEBOOK, ENCODER), "codes+frozen": (CODEBOOK, ENCODER),
               "frozen_aligned": (ENCODER,)}.get(arm, ())
    tags.update(reg.parent_tags(parents, facts.codebook_version, facts.encoder_version))
    return ctx.tracker.register_folder(str(folder), f"ranker_{arm.replace('+', '_')}", RANKER,
                                       tags=tags)


def tuned_summary(cfg) -> dict[str, dict]:
    """The settings each arm trains with (its tuned overrides applied)."""
    return {arm: cfg.train.settings(arm) for arm in cfg.train.arms}


STAGE = Stage(
    "train", run, engine="torch", inputs=inputs, outputs=("ranker_predictions",),
    config=lambda cfg: ("train",) + (("daily",) if cfg.daily.incremental else ()),
    previous=("ranker_predictions", "split_events"),
    help="train the TorchRec ranker for every ablation arm (sharded, fused optimizers, local "
         "ranks or torchrun, early stopping on the validation part), score the validation and "
         "test examples and the baselines (popularity, MF), register in MLflow")

