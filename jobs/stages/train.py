"""``train``: train the TorchRec ranker for every ablation arm on the training part (sharded,
fused optimizers, local ranks or torchrun), score the validation and test examples, register
each arm in MLflow."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.report import text_table
from jobs.stage import DagError, Stage, StageContext, StageReport

FROZEN_ARMS = ("frozen_mm", "codes+frozen")


def uses_frozen_table(cfg) -> bool:
    return cfg.examples.frozen_embedding and any(a in FROZEN_ARMS for a in cfg.train.arms)


def inputs(cfg) -> tuple[str, ...]:
    # The frozen arms look the history items' content vectors up in the embeddings table.
    return ("train_examples", "valid_examples", "eval_examples") + (
        ("item_embeddings",) if uses_frozen_table(cfg) else ())


@dataclass
class TrainReport(StageReport):
    #: One row per arm: arm, steps, final loss, examples/s, registered version (or None).
    arms: list[dict]
    setup: str

    def text(self) -> str:
        return text_table([("arm", "s"), ("steps", "d"), ("final loss", ".4f"),
                           ("examples/s", ".0f"), ("registered", "s")],
                          [(a["arm"], a["steps"], a["final_loss"], a["examples_per_s"],
                            f"qarm-ranker v{a['version']}" if a["version"] else "-")
                           for a in self.arms]) + "\n" + self.setup

    def metrics(self) -> dict[str, float]:
        return {f"{a['arm']}.{k}": a[k] for a in self.arms
                for k in ("final_loss", "steps", "examples_per_s")}


def run(ctx: StageContext) -> TrainReport:
    import pyarrow as pa

    from feature_store import schemas
    from feature_store.arrays import ids_and_matrix
    from feature_store.facts import ExamplesFacts, PredictionsFacts
    from recsys.features import spec_for_examples
    from recsys.runner import load_trained, train_arm, write_frozen_table

    io, t = ctx.io, ctx.cfg.train
    facts = io.facts("train_examples", ExamplesFacts)
    runs = ctx.run_dir("train")
    frozen_table = ""
    if io.has("item_embeddings"):
        emb = io.manifest("item_embeddings")
        if facts.frozen_embeddings != emb.ref:
            raise DagError(f"the examples were built with {facts.frozen_embeddings}, but the "
                           f"embeddings are now {emb.ref}: re-run the examples stage")
        ids, vecs = ids_and_matrix(io.arrow("item_embeddings"), "embedding")
        frozen_table = write_frozen_table(ids, vecs, facts.n_items,
                                          runs / f"frozen_table_{emb.snapshot_id}.npy")
    preds, rows = [], []
    for arm in t.arms:
        # Validation and test examples are both scored; the predictions carry their part.
        res = train_arm(spec_for_examples(arm, t.model, facts), t, io.files("train_examples"),
                        io.files("valid_examples") + io.files("eval_examples"),
                        runs / arm.replace("+", "_"), frozen_table=frozen_table)
        curve = res.result["loss_curve"]
        for step in range(0, len(curve), max(1, len(curve) // 200)):
            ctx.tracker.metrics({f"{arm}.train_loss": curve[step]}, step=step)
        version = None
        if t.register:
            version = ctx.tracker.register_torch_model(
                load_trained(res.out_dir), f"ranker_{arm.replace('+', '_')}", "qarm-ranker",
                tags={"arm": arm, "codebook_version": facts.codebook_version,
                      "encoder_version": facts.encoder_version,
                      "examples": io.manifest("train_examples").ref,
                      "world_size": res.result["world"]})
        preds.append(res.predictions)
        rows.append({"arm": arm, "steps": res.result["steps"],
                     "final_loss": (float(sum(curve[-20:]) / len(curve[-20:])) if curve
                                    else float("nan")),
                     "examples_per_s": res.result["examples_per_second"], "version": version})
    out = io.write_arrow("ranker_predictions", pa.concat_tables(preds),
                         schema=schemas.predictions_schema(),
                         facts=PredictionsFacts(tuple(t.arms), t.ranks, facts.codebook_version,
                                                facts.encoder_version))
    setup = (f"ranks: {t.ranks} ({t.launcher}, {t.device}); global batch {t.batch_size}; "
             f"{t.epochs} epochs; runs in {runs}")
    return TrainReport({"ranker_predictions": out}, rows, setup)


STAGE = Stage(
    "train", run, inputs=inputs, outputs=("ranker_predictions",), config=("train",),
    help="train the TorchRec ranker for every ablation arm (sharded, fused optimizers, local "
         "ranks or torchrun), score the validation and test examples, register in MLflow")
