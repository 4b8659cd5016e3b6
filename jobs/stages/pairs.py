"""``pairs``: mine behaviour pairs from the training part: Swing, ItemCF, U2I triggers (Spark)."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.report import text_table
from jobs.stage import Stage, StageContext, StageReport


@dataclass
class PairsReport(StageReport):
    train_events: int
    by_source: dict[str, tuple[int, float]]

    def text(self) -> str:
        return f"mined from the {self.train_events} events of the training part\n" + text_table(
            [("source", "s"), ("pairs", "d"), ("mean score", ".4f")],
            [(s, n, m) for s, (n, m) in sorted(self.by_source.items())])

    def metrics(self) -> dict[str, float]:
        return {f"pairs.{s}": n for s, (n, _) in self.by_source.items()}


def run(ctx: StageContext) -> PairsReport:
    from feature_store import schemas
    from pyspark.sql import functions as F

    from feature_store.facts import PairsFacts, SplitFacts
    from pipelines.pairs import mine_pairs, pair_summary

    spark, io = ctx.spark, ctx.io
    train = io.spark(spark, "split_events").where(F.col("part") == "train")
    pairs = mine_pairs(train, io.spark(spark, "item_embeddings"), ctx.cfg.pairs)
    split = io.facts("split_events", SplitFacts)
    out = io.write_spark("item_pairs", pairs, schemas.item_pairs_schema(),
                         facts=PairsFacts(split.mode))
    return PairsReport({"item_pairs": out}, split.rows["train"],
                       pair_summary(io.written_spark(spark, out)))


STAGE = Stage(
    "pairs", run, engine="spark", inputs=("split_events", "item_embeddings"),
    outputs=("item_pairs",), config=("pairs",),
    help="mine behaviour pairs from the training part: Swing, ItemCF, U2I triggers (Spark)")
