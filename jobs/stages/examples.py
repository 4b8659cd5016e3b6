"""``examples``: ranker examples: the split, the history before each event, target codes, cold
flags and sampled negatives for implicit feedback (Spark)."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.report import text_table
from jobs.stage import Stage, StageContext, StageReport


def inputs(cfg) -> tuple[str, ...]:
    ins = ("events", "items", "item_codes")
    if cfg.quantize.raw_arm:
        ins += ("item_codes_raw",)
    if cfg.examples.frozen_embedding:
        ins += ("item_embeddings",)
    return ins


@dataclass
class ExamplesReport(StageReport):
    train_end: str
    history_len: int
    splits: dict[str, dict]
    implicit_negatives: bool
    neg_ratio: int

    def text(self) -> str:
        table = text_table(
            [("split", "s"), ("examples", "d"), ("positives", "d"), ("sampled negatives", "d"),
             ("cold-item examples", "d"), ("mean history", ".2f")],
            [(name, s["n"], s["positives"], s["sampled"], s["cold"], s["mean_history"])
             for name, s in self.splits.items()])
        negatives = (f"sampled (implicit feedback), {self.neg_ratio} per positive"
                     if self.implicit_negatives else "observed (labelled events)")
        return (f"training period ends {self.train_end}; history: last {self.history_len} "
                f"positives strictly before each event\n{table}\nnegatives: {negatives}")

    def metrics(self) -> dict[str, float]:
        return {f"{name}.{k}": s[k] for name, s in self.splits.items()
                for k in ("n", "positives", "sampled", "cold", "mean_history")}


def run(ctx: StageContext) -> ExamplesReport:
    from feature_store import schemas
    from feature_store.facts import CodesFacts, EmbeddingFacts, ExamplesFacts
    from pipelines.accounting import check_rows
    from pipelines.examples import build_examples, example_stats
    from pipelines.split import train_end

    cfg, io, spark = ctx.cfg, ctx.io, ctx.spark
    events = io.spark(spark, "events")
    end = train_end(cfg.split, events)
    codes_raw = io.spark(spark, "item_codes_raw") if io.has("item_codes_raw") else None
    frozen = io.spark(spark, "item_embeddings") if io.has("item_embeddings") else None
    train, evals, built = build_examples(events, io.spark(spark, "items"),
                                         io.spark(spark, "item_codes"), codes_raw, frozen, end,
                                         cfg.examples)
    stats = example_stats(train, evals)
    codes = io.facts("item_codes", CodesFacts)
    facts = ExamplesFacts(
        implicit_negatives=built["implicit_negatives"], levels=built["levels"],
        n_items=built["n_items"], n_users=stats.n_users, train_end=built["train_end"],
        history_len=built["history_len"], raw_codes=built["raw_codes"],
        frozen=built["frozen"],
        frozen_dim=io.facts("item_embeddings", EmbeddingFacts).dim if frozen is not None else 0,
        frozen_embeddings=io.manifest("item_embeddings").ref if frozen is not None else None,
        codes_per_level=stats.codes_per_level, mean_history=stats.mean_history,
        mean_vq=stats.mean_vq, codebook_version=codes.codebook_version,
        encoder_version=codes.encoder_version)
    schema = schemas.examples_schema(facts.levels)
    out = {"train_examples": io.write_spark("train_examples", train, schema, facts=facts),
           "eval_examples": io.write_spark("eval_examples", evals, schema, facts=facts)}
    check_rows("examples: events in, observed examples out", io.manifest("events").row_count,
               stats.observed)
    check_rows("examples: examples written", stats.total,
               sum(m.row_count for m in out.values()))
    return ExamplesReport(out, end.isoformat(), cfg.examples.history_len, stats.splits,
                          facts.implicit_negatives, cfg.examples.neg_ratio)


STAGE = Stage(
    "examples", run, inputs=inputs, outputs=("train_examples", "eval_examples"),
    config=("examples", "split"),
    help="ranker examples: time split, history before each event, target codes, cold flags, "
         "sampled negatives for implicit feedback (Spark)")
