"""``quantize_raw``: codes from the raw (unaligned) embeddings, for the ``codes_raw`` ablation arm,
and how much held-out behaviour aligned vs raw codes share."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.report import text_table
from jobs.stage import Stage, StageContext
from jobs.stages.quantize import CodebookReport, quantize_table


@dataclass
class RawCodebookReport(CodebookReport):
    #: ``quantizer.metrics.behaviour_sharing`` rows for the aligned and the raw codes.
    sharing: list[dict] = None

    def text(self) -> str:
        return super().text() + "\nheld-out next clicks sharing an RQ prefix\n" + text_table(
            [("prefix", "d"), ("pairs", "d"), ("aligned", ".4f"), ("raw", ".4f"),
             ("random: aligned", ".4f"), ("raw", ".4f")],
            [(r["prefix"], r["pairs"], r["aligned"], r["raw"], r["aligned_random"],
              r["raw_random"]) for r in self.sharing])

    def metrics(self) -> dict[str, float]:
        m = super().metrics()
        for r in self.sharing:
            for name in ("aligned", "raw"):
                m[f"heldout_share_prefix{r['prefix']}.{name}"] = r[name]
                m[f"random_share_prefix{r['prefix']}.{name}"] = r[f"{name}_random"]
        return m


def run(ctx: StageContext) -> RawCodebookReport:
    import dataclasses

    from feature_store.arrays import ids_and_matrix
    from pipelines.pairs import heldout_next_pairs
    from quantizer.metrics import behaviour_sharing

    io = ctx.io
    base = quantize_table(ctx, "item_embeddings", "item_codes_raw")
    pairs = heldout_next_pairs(io.spark(ctx.spark, "split_events")).select(
        "src", "dst").toPandas()
    codes = {"aligned": ids_and_matrix(io.arrow("item_codes"), "rq", dtype="int32"),
             "raw": ids_and_matrix(io.written_arrow(base.outputs["item_codes_raw"]), "rq",
                                   dtype="int32")}
    sharing = behaviour_sharing(pairs.src.to_numpy(), pairs.dst.to_numpy(), codes)
    return RawCodebookReport(**{f.name: getattr(base, f.name)
                                for f in dataclasses.fields(base)}, sharing=sharing)


STAGE = Stage(
    "quantize_raw", run, engine="spark", inputs=("item_embeddings", "item_codes", "split_events"),
    outputs=("item_codes_raw",), config=("quantize",),
    applies=lambda cfg: cfg.quantize.raw_arm,
    help="codes from the raw (unaligned) embeddings: the codes_raw arm, and how much held-out "
         "behaviour aligned vs raw codes share")
