"""``quantize``: fit VQ/RQ codebooks on the aligned embeddings and code every item (Spark)."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.stage import Stage, StageContext, StageReport


@dataclass
class CodebookReport(StageReport):
    codebook_version: str
    fitted: bool
    sample_size: int
    rq_levels: int
    rq_codes: int
    rq_method: str
    vq_k: int
    vq_pool: int
    vq_index: str
    coded: int
    #: ``quantizer.metrics.codebook_metrics`` of the fit sample.
    codebook_metrics: dict

    def text(self) -> str:
        from quantizer.metrics import format_table

        how = f"fitted on {self.sample_size} embeddings" if self.fitted else \
            "existing, assign-only"
        return (f"codebook {self.codebook_version} ({how}; RQ {self.rq_levels} x {self.rq_codes}, "
                f"{self.rq_method}; VQ k={self.vq_k} over a pool of {self.vq_pool} items, index "
                f"{self.vq_index}); {self.coded} items coded\n"
                + format_table(self.codebook_metrics))

    def metrics(self) -> dict[str, float]:
        from quantizer.metrics import flat_metrics

        return {**flat_metrics(self.codebook_metrics), "coded": self.coded,
                "fitted": int(self.fitted)}


def quantize_table(ctx: StageContext, source: str, output: str,
                   codebook_version: str | None = None) -> CodebookReport:
    """Code every item of the embeddings input ``source`` into the codes output ``output``."""
    from feature_store import schemas
    from feature_store.facts import CodesFacts, EmbeddingFacts
    from pipelines.accounting import check_rows
    from pipelines.quantize import quantize_embeddings

    io, q = ctx.io, ctx.cfg.quantize
    src = io.manifest(source)
    res = quantize_embeddings(ctx.spark, io.spark(ctx.spark, source), src.row_count, q,
                              str(ctx.artifacts / "codebooks"), src.ref, codebook_version)
    cb = res.codebook
    if res.fitted:
        # The codebook as arrays (codebook.npz, read without pickle) and its config; its
        # encoder's registered version ties it to its lineage.
        enc_version = io.facts(source, EmbeddingFacts).encoder_version
        enc_model = None
        if ctx.cfg.mlflow.enabled:
            from jobs.registry import ENCODER, Registry

            found = Registry(ctx.cfg).find(ENCODER, encoder_version=enc_version)
            enc_model = None if found is None else found.version
        ctx.tracker.register_folder(
            res.folder, f"codebook_{output}", "qarm-codebook",
            tags={"codebook_version": cb.version, "encoder_version": enc_version,
                  "embeddings_snapshot": src.ref,
                  "kind": "raw" if output.endswith("_raw") else "aligned",
                  **({"encoder_model_version": enc_model} if enc_model else {})})
    facts = CodesFacts(cb.version, res.levels, res.fitted, src.ref,
                       io.facts(source, EmbeddingFacts).encoder_version, q.disambiguate)
    out = io.write_spark(output, res.codes, schemas.item_codes_schema(res.levels), facts=facts)
    check_rows(f"{output}: embeddings coded", src.row_count, out.row_count)
    return CodebookReport({output: out}, cb.version, res.fitted, res.sample_size,
                          cb.rq.centroids.shape[0], cb.rq.cfg.codes,
                          cb.rq.fit_record.get("method", ""), cb.vq.cfg.k, len(cb.vq.pool_ids),
                          cb.vq.cfg.index, out.row_count, res.metrics)


def run(ctx: StageContext) -> CodebookReport:
    from feature_store.facts import DailyPlanFacts

    version = ctx.cfg.quantize.codebook
    if ctx.io.has("daily_plan"):     # a daily run without drift keeps the previous codebook
        plan = ctx.io.facts("daily_plan", DailyPlanFacts)
        if not plan.refit:
            version = plan.codebook_version
    return quantize_table(ctx, "aligned_item_embeddings", "item_codes", version)


def inputs(cfg) -> tuple[str, ...]:
    return ("aligned_item_embeddings",) + (("daily_plan",) if cfg.daily.incremental else ())


STAGE = Stage(
    "quantize", run, engine="spark", inputs=inputs, outputs=("item_codes",),
    config=("quantize",),
    help="fit VQ/RQ codebooks on the aligned embeddings and code every item (Spark)")
