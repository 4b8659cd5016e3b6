"""``evaluate``: the ablation table: AUC, GAUC, LogLoss, NE (calibrated, and against the training
base rate) per arm and baseline on the test part (overall, cold items, known and new users) with
bootstrap intervals over users, the paired differences between arms, and the validation part;
with the synthetic world's ground truth as the ceiling. Writes ``ablation.json`` to MLflow."""

from __future__ import annotations

import json
from dataclasses import dataclass

from jobs.stage import Stage, StageContext, StageReport
from jobs.stages.world import is_synthetic


def inputs(cfg) -> tuple[str, ...]:
    return ("ranker_predictions",) + (("truth_events", "item_id_map", "user_id_map")
                                      if is_synthetic(cfg) else ())


@dataclass
class EvaluateReport(StageReport):
    table: str
    values: dict[str, float]

    def text(self) -> str:
        return self.table

    def metrics(self) -> dict[str, float]:
        return self.values


def load_truth(io):
    if not io.has("truth_events"):
        return None
    from pipelines.synthetic import truth_in_dense_ids

    return truth_in_dense_ids(io.arrow("truth_events").to_pandas(),
                              io.arrow("item_id_map").to_pandas(),
                              io.arrow("user_id_map").to_pandas())


def run(ctx: StageContext) -> EvaluateReport:
    import pyarrow as pa

    from feature_store.facts import PredictionsFacts
    from jobs.stages.train import tuned_summary
    from recsys.evaluation import evaluate, flat_metrics, format_table, metrics_frame

    io, a = ctx.io, ctx.cfg.ablation
    facts = io.facts("ranker_predictions", PredictionsFacts)
    result = evaluate(io.arrow("ranker_predictions").to_pandas(), load_truth(io),
                      facts.train_rate, a.bootstrap, a.level, settings=tuned_summary(ctx.cfg))
    out = io.write_arrow("ranker_metrics",
                         pa.Table.from_pandas(metrics_frame(result), preserve_index=False))
    table = format_table(result)
    ctx.tracker.artifact_text(table, "ablation.txt")
    text = json.dumps(result, indent=1, default=float)
    ctx.tracker.artifact_text(text, "ablation.json")
    folder = ctx.run_dir("evaluate")               # read by the run report
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ablation.json").write_text(text)
    return EvaluateReport({"ranker_metrics": out}, table, flat_metrics(result))


STAGE = Stage(
    "evaluate", run, inputs=inputs, outputs=("ranker_metrics",), config=("ablation",),
    help="AUC, GAUC, LogLoss, NE (calibrated, against the training rate) per arm and baseline "
         "on the test part (overall, cold items, known and new users) with bootstrap intervals "
         "and paired differences, and the validation part: the ablation table, with the "
         "synthetic ground truth as the ceiling")
