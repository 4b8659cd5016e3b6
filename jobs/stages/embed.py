"""``embed``: encode every item with the content towers + fusion (Spark batch inference)."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.stage import Stage, StageContext, StageReport


@dataclass
class EmbedReport(StageReport):
    items_in: int
    embedded: int
    quarantined: int
    encoder_version: str
    encoder_loads: int
    worker_peak_rss_mb: float
    artifact: str
    summary: str

    def text(self) -> str:
        return (f"embedded {self.embedded} of {self.items_in} items (quarantined "
                f"{self.quarantined}) with encoder {self.encoder_version} ({self.summary}); "
                f"encoder loaded {self.encoder_loads}x across Python workers; artifact "
                f"{self.artifact}")

    def metrics(self) -> dict[str, float]:
        return {"items_in": self.items_in, "embedded": self.embedded,
                "quarantined": self.quarantined, "encoder_loads": self.encoder_loads,
                "worker_peak_rss_mb": self.worker_peak_rss_mb}


def run(ctx: StageContext) -> EmbedReport:
    from feature_store import schemas
    from feature_store.facts import EmbeddingFacts, FeatureFacts
    from mm_encoder.item_encoder import ItemEncoder
    from pipelines.accounting import check_rows
    from pipelines.embed import embed_items

    cfg, io = ctx.cfg, ctx.io
    encoder = ItemEncoder(cfg.encoder)
    folder = encoder.save(str(ctx.artifacts / "encoders"))
    ctx.tracker.artifact_dir(folder, "encoder")
    frames = embed_items(ctx.spark, io.spark(ctx.spark, "items"), encoder, cfg.embed)
    emb = io.write_spark("item_embeddings", frames.embeddings,
                         schemas.item_embeddings_schema(cfg.encoder.dim),
                         facts=EmbeddingFacts(cfg.encoder.dim, encoder.version, folder))
    feats = io.write_spark("item_features", frames.features, schemas.item_features_schema(),
                           facts=FeatureFacts(encoder.towers.dims(), encoder.version))
    q = io.write_spark("embed_quarantine", frames.quarantine, schemas.quarantine_schema())
    stats = frames.stats()
    frames.release()
    n_in = io.manifest("items").row_count
    check_rows("embed", n_in, emb.row_count, q.row_count)
    e = cfg.encoder
    return EmbedReport(
        {"item_embeddings": emb, "item_features": feats, "embed_quarantine": q},
        n_in, emb.row_count, q.row_count, encoder.version, stats.loads, stats.peak_rss_mb,
        folder, f"D={e.dim}, text={e.text_tower}, image={e.image_tower}")


STAGE = Stage(
    "embed", run, inputs=("items",),
    outputs=("item_embeddings", "item_features", "embed_quarantine"),
    config=("encoder", "embed"),
    help="encode every item with the content towers + fusion (Spark batch inference)")
