"""``examples``: ranker examples per part of the split: the history before each event, target
codes, cold / new-user flags and sampled negatives for implicit feedback (Spark)."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.report import text_table
from jobs.stage import Stage, StageContext, StageReport

OUTPUTS = ("train_examples", "valid_examples", "eval_examples")


def inputs(cfg) -> tuple[str, ...]:
    ins = ("split_events", "items", "item_codes")
    if cfg.quantize.raw_arm:
        ins += ("item_codes_raw",)
    if cfg.examples.frozen_embedding:
        ins += ("item_embeddings",)
    if cfg.pretrain.enabled:          # the tagger's predicted tags: the pred_tags column
        ins += ("item_pred_tags",)
    return ins


@dataclass
class ExamplesReport(StageReport):
    split_mode: str
    history_len: int
    parts: dict[str, dict]
    implicit_negatives: bool
    neg_ratio: int

    def text(self) -> str:
        table = text_table(
            [("part", "s"), ("examples", "d"), ("positives", "d"), ("sampled negatives", "d"),
             ("cold-item examples", "d"), ("new-user examples", "d"), ("mean history", ".2f")],
            [(name, s["n"], s["positives"], s["sampled"], s["cold"], s["new_user"],
              s["mean_history"]) for name, s in self.parts.items()])
        negatives = (f"sampled (implicit feedback), {self.neg_ratio} per positive"
                     if self.implicit_negatives else "observed (labelled events)")
        return (f"split {self.split_mode}; history: last {self.history_len} positives strictly "
                f"before each event\n{table}\nnegatives: {negatives}")

    def metrics(self) -> dict[str, float]:
        return {f"{name}.{k}": s[k] for name, s in self.parts.items()
                for k in ("n", "positives", "sampled", "cold", "new_user", "mean_history")}


def run(ctx: StageContext) -> ExamplesReport:
    from feature_store import schemas
    from feature_store.facts import CodesFacts, EmbeddingFacts, ExamplesFacts, SplitFacts
    from pipelines.accounting import check_rows
    from pipelines.examples import build_examples, example_stats

    cfg, io, spark = ctx.cfg, ctx.io, ctx.spark
    codes_raw = io.spark(spark, "item_codes_raw") if io.has("item_codes_raw") else None
    frozen = io.spark(spark, "item_embeddings") if io.has("item_embeddings") else None
    split = io.facts("split_events", SplitFacts)
    pred_tags = (io.arrow("item_pred_tags", ["item_id", "pred_tags"]).to_pandas()
                 if io.has("item_pred_tags") else None)
    every, tables, built = build_examples(io.spark(spark, "split_events"),
                                          io.spark(spark, "items"),
                                          io.spark(spark, "item_codes"), codes_raw, frozen,
                                          cfg.examples, pred_tags)
    stats = example_stats(every)
    codes = io.facts("item_codes", CodesFacts)
    facts = ExamplesFacts(
        implicit_negatives=built["implicit_negatives"], levels=built["levels"],
        n_items=built["n_items"], n_users=stats.n_users, split_mode=split.mode,
        history_len=built["history_len"], raw_codes=built["raw_codes"],
        frozen=built["frozen"],
        frozen_dim=io.facts("item_embeddings", EmbeddingFacts).dim if frozen is not None else 0,
        frozen_embeddings=io.manifest("item_embeddings").ref if frozen is not None else None,
        codes_per_level=stats.codes_per_level, mean_history=stats.mean_history,
        mean_vq=stats.mean_vq, codebook_version=codes.codebook_version,
        encoder_version=codes.encoder_version, pred_tag_vocab=built["pred_tag_vocab"],
        mean_pred_tags=stats.mean_pred_tags)
    schema = schemas.examples_schema(facts.levels, raw_codes=facts.raw_codes)
    out = {t: io.write_spark(t, df, schema, facts=facts) for t, df in tables.items()}
    every.unpersist()
    check_rows("examples: events in, observed examples out",
               io.manifest("split_events").row_count, stats.observed)
    check_rows("examples: examples written", stats.total,
               sum(m.row_count for m in out.values()))
    return ExamplesReport(out, split.mode, cfg.examples.history_len, stats.parts,
                          facts.implicit_negatives, cfg.examples.neg_ratio)


STAGE = Stage(
    "examples", run, engine="spark", inputs=inputs, outputs=OUTPUTS, config=("examples",),
    help="ranker examples per part of the split: history before each event, target codes, "
         "cold and new-user flags, sampled negatives for implicit feedback (Spark)")
