"""``pairs``: mine behaviour pairs from the training part: Swing, ItemCF, U2I triggers (Spark)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from jobs.report import text_table
from jobs.stage import Stage, StageContext, StageReport


@dataclass
class PairsReport(StageReport):
    train_events: int
    by_source: dict[str, tuple[int, float]]
    window_days: Optional[int] = None

    def text(self) -> str:
        which = (f"the last {self.window_days} days of the training part ({self.train_events} "
                 "events)" if self.window_days else
                 f"the {self.train_events} events of the training part")
        return f"mined from {which}\n" + text_table(
            [("source", "s"), ("pairs", "d"), ("mean score", ".4f")],
            [(s, n, m) for s, (n, m) in sorted(self.by_source.items())])

    def metrics(self) -> dict[str, float]:
        return {f"pairs.{s}": n for s, (n, _) in self.by_source.items()}


def run(ctx: StageContext) -> PairsReport:
    from feature_store import schemas
    from pyspark.sql import functions as F

    from feature_store.facts import PairsFacts, SplitFacts
    from pipelines.pairs import mine_pairs, pair_summary, recent

    spark, io, cfg = ctx.spark, ctx.io, ctx.cfg.pairs
    train = io.spark(spark, "split_events").where(F.col("part") == "train")
    split = io.facts("split_events", SplitFacts)
    n = split.rows["train"]
    if cfg.window_days is not None:       # a sliding window over the training part
        train = recent(train, cfg.window_days)
        n = train.count()
    pairs = mine_pairs(train, io.spark(spark, "item_embeddings"), cfg)
    out = io.write_spark("item_pairs", pairs, schemas.item_pairs_schema(),
                         facts=PairsFacts(split.mode))
    return PairsReport({"item_pairs": out}, n, pair_summary(io.written_spark(spark, out)),
                       cfg.window_days)


STAGE = Stage(
    "pairs", run, engine="spark", inputs=("split_events", "item_embeddings"),
    outputs=("item_pairs",), config=("pairs",),
    help="mine behaviour pairs from the training part: Swing, ItemCF, U2I triggers (Spark)")
