"""``pairs``: mine behaviour pairs from the training period: Swing, ItemCF, U2I triggers (Spark)."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.report import text_table
from jobs.stage import Stage, StageContext, StageReport


@dataclass
class PairsReport(StageReport):
    train_end: str
    by_source: dict[str, tuple[int, float]]

    def text(self) -> str:
        return f"training period ends {self.train_end}\n" + text_table(
            [("source", "s"), ("pairs", "d"), ("mean score", ".4f")],
            [(s, n, m) for s, (n, m) in sorted(self.by_source.items())])

    def metrics(self) -> dict[str, float]:
        return {f"pairs.{s}": n for s, (n, _) in self.by_source.items()}


def run(ctx: StageContext) -> PairsReport:
    from feature_store import schemas
    from feature_store.facts import PairsFacts
    from pipelines.pairs import mine_pairs, pair_summary
    from pipelines.split import train_end

    spark, io = ctx.spark, ctx.io
    events = io.spark(spark, "events")
    end = train_end(ctx.cfg.split, events)
    pairs = mine_pairs(events, io.spark(spark, "item_embeddings"), end, ctx.cfg.pairs)
    out = io.write_spark("item_pairs", pairs, schemas.item_pairs_schema(),
                         facts=PairsFacts(end.isoformat()))
    return PairsReport({"item_pairs": out}, end.isoformat(),
                       pair_summary(io.written_spark(spark, out)))


STAGE = Stage(
    "pairs", run, inputs=("events", "item_embeddings"), outputs=("item_pairs",),
    config=("pairs", "split"),
    help="mine behaviour pairs from the training period: Swing, ItemCF, U2I triggers (Spark)")
