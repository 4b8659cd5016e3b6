"""``evaluate``: the ablation table: AUC, GAUC, LogLoss, NE per arm on the test part (overall,
cold items, known and new users) and the validation part, with the synthetic world's ground
truth as the ceiling."""

from __future__ import annotations

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


def run(ctx: StageContext) -> EvaluateReport:
    import pyarrow as pa

    from recsys.evaluation import ablation_metrics, flat_metrics, format_table

    io = ctx.io
    truth = None
    if io.has("truth_events"):
        from pipelines.synthetic import truth_in_dense_ids

        truth = truth_in_dense_ids(io.arrow("truth_events").to_pandas(),
                                   io.arrow("item_id_map").to_pandas(),
                                   io.arrow("user_id_map").to_pandas())
    df = ablation_metrics(io.arrow("ranker_predictions").to_pandas(), truth)
    out = io.write_arrow("ranker_metrics", pa.Table.from_pandas(df, preserve_index=False))
    table = format_table(df)
    ctx.tracker.artifact_text(table, "ablation.txt")
    return EvaluateReport({"ranker_metrics": out}, table, flat_metrics(df))


STAGE = Stage(
    "evaluate", run, inputs=inputs, outputs=("ranker_metrics",), config=(),
    help="AUC, GAUC, LogLoss, NE per arm on the test part (overall, cold items, known and new "
         "users) and the validation part: the ablation table, with the synthetic ground truth "
         "as the ceiling")
