"""``embed``: encode every item with the content towers + fusion (Spark batch inference); dated
tags join an item's tags only when written before their author's split point."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.stage import Stage, StageContext, StageReport


def has_dated_tags(cfg) -> bool:
    """Whether the source has dated item tags (they then depend on the split)."""
    return cfg.source.kind == "movielens" or (cfg.source.kind == "generic"
                                              and bool(cfg.source.item_tags))


def inputs(cfg) -> tuple[str, ...]:
    # The tagger image tower is the backbone the pretrain stage trained; the camoe video tower
    # is the video side of the video-text model it trained.
    return ("items",) + (("item_tags", "split_events") if has_dated_tags(cfg) else ()) + (
        ("item_pred_tags",) if cfg.encoder.image_tower == "tagger" else ()) + (
        ("item_video_embeddings",) if camoe_video(cfg) and not cfg.encoder.camoe_path else ()) + (
        ("item_highlights",) if cfg.encoder.video_highlight else ())


def camoe_video(cfg) -> bool:
    return cfg.encoder.video and cfg.encoder.video_tower == "camoe"


def encoder_config(cfg, io):
    """The encoder config, with the tagger folder of the pretrain stage's output when the image
    tower is the tagger, and the video-text model's folder when the video tower is camoe."""
    import dataclasses

    from feature_store.facts import TaggerFacts, VideoTextFacts
    from mm_encoder.camoe import CAMoEError

    enc = cfg.encoder
    if enc.image_tower == "tagger" and not enc.tagger_path:
        enc = dataclasses.replace(enc, tagger_path=io.facts("item_pred_tags",
                                                            TaggerFacts).folder)
    if camoe_video(cfg) and not enc.camoe_path:
        facts = io.facts("item_video_embeddings", VideoTextFacts)
        if not facts.version:
            raise CAMoEError("encoder.video_tower is camoe, but the pretrain stage trained no "
                             "video-text model (no item has a video and a caption)")
        enc = dataclasses.replace(enc, camoe_path=facts.folder)
    return enc


def highlight_videos(items, highlights):
    """``items`` with each video cut to its highlight (frames ``floor(start * n)`` to
    ``ceil(end * n)``, at least one); items without a highlight keep their whole video."""
    from pyspark.sql import functions as F

    h = highlights.select("item_id", "highlight_start", "highlight_end")
    n = F.size("video")
    first = F.floor(F.col("highlight_start") * n).cast("int")
    length = F.greatest(F.ceil(F.col("highlight_end") * n).cast("int") - first, F.lit(1))
    cut = F.slice("video", first + 1, length)
    return (items.join(h, "item_id", "left")
            .withColumn("video", F.when(F.col("highlight_start").isNotNull() & (n > 0), cut)
                        .otherwise(F.col("video")))
            .drop("highlight_start", "highlight_end"))


def item_content(ctx: StageContext):
    """The items as the encoder reads them: with the dated tags allowed by the split."""
    from feature_store.facts import SplitFacts
    from pipelines.item_tags import allowed_tags, with_allowed_tags

    io, spark = ctx.io, ctx.spark
    items = io.spark(spark, "items")
    if io.has("item_highlights"):
        items = highlight_videos(items, io.spark(spark, "item_highlights"))
    if not io.has("item_tags"):
        return items
    return with_allowed_tags(items, allowed_tags(io.spark(spark, "item_tags"),
                                                 io.spark(spark, "split_events"),
                                                 io.facts("split_events", SplitFacts)))


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
    #: Daily runs: items whose content hash and encoder were the previous day's (their
    #: embeddings and features carried over, not recomputed), and items whose content changed.
    kept: int = 0
    changed: int = 0

    def text(self) -> str:
        daily = (f"; {self.kept} unchanged items kept the previous day's embeddings, "
                 f"{self.changed} changed items re-embedded" if self.kept or self.changed else "")
        return (f"embedded {self.embedded - self.kept} of {self.items_in} items (quarantined "
                f"{self.quarantined}) with encoder {self.encoder_version} ({self.summary})"
                f"{daily}; encoder loaded {self.encoder_loads}x across Python workers; "
                f"artifact {self.artifact}")

    def metrics(self) -> dict[str, float]:
        return {"items_in": self.items_in, "embedded": self.embedded - self.kept,
                "kept": self.kept, "changed": self.changed,
                "quarantined": self.quarantined, "encoder_loads": self.encoder_loads,
                "worker_peak_rss_mb": self.worker_peak_rss_mb}


def run(ctx: StageContext) -> EmbedReport:
    from feature_store import schemas
    from feature_store.facts import EmbeddingFacts, FeatureFacts
    from mm_encoder.item_encoder import ItemEncoder
    from pipelines.accounting import check_rows
    from pipelines.embed import embed_items, increment, with_content_hash

    cfg, io, spark = ctx.cfg, ctx.io, ctx.spark
    encoder = ItemEncoder(encoder_config(cfg, io))
    folder = encoder.save(str(ctx.artifacts / "encoders"))
    ctx.tracker.artifact_dir(folder, "encoder")
    items = with_content_hash(item_content(ctx))
    # A daily run embeds only new and changed items when the encoder is the previous day's.
    prev = io.previous_day("item_embeddings")
    same_encoder = (prev is not None and io.previous_day("item_content_hashes") is not None
                    and prev.facts_of(EmbeddingFacts).encoder_version == encoder.version)
    inc = increment(items, io.previous_day_spark(spark, "item_content_hashes")
                    if same_encoder else None)
    frames = embed_items(spark, inc.to_embed, encoder, cfg.embed)
    embeddings, features = frames.embeddings, frames.features
    hashes = inc.to_embed.select("item_id", "content_hash").join(
        embeddings.select("item_id"), "item_id", "left_semi")
    if inc.kept:
        def carried(table):
            return io.previous_day_spark(spark, table).join(inc.kept_ids, "item_id", "left_semi")
        embeddings = embeddings.unionByName(carried("item_embeddings"))
        features = features.unionByName(carried("item_features"))
        hashes = hashes.unionByName(carried("item_content_hashes"))
    emb = io.write_spark("item_embeddings", embeddings,
                         schemas.item_embeddings_schema(cfg.encoder.dim),
                         facts=EmbeddingFacts(cfg.encoder.dim, encoder.version, folder))
    feats = io.write_spark("item_features", features, schemas.item_features_schema(),
                           facts=FeatureFacts(encoder.towers.dims(), encoder.version))
    h = io.write_spark("item_content_hashes", hashes.select("item_id", "content_hash"),
                       schemas.content_hashes_schema())
    q = io.write_spark("embed_quarantine", frames.quarantine, schemas.quarantine_schema())
    stats = frames.stats()
    frames.release()
    n_in = io.manifest("items").row_count
    check_rows("embed", n_in, emb.row_count, q.row_count)
    check_rows("embed: content hashes", emb.row_count, h.row_count)
    e = cfg.encoder
    return EmbedReport(
        {"item_embeddings": emb, "item_features": feats, "item_content_hashes": h,
         "embed_quarantine": q},
        n_in, emb.row_count, q.row_count, encoder.version, stats.loads, stats.peak_rss_mb,
        folder, f"D={e.dim}, text={e.text_tower}, image={e.image_tower}", inc.kept, inc.changed)


STAGE = Stage(
    "embed", run, engine="spark", inputs=inputs,
    outputs=("item_embeddings", "item_features", "item_content_hashes", "embed_quarantine"),
    config=("encoder", "embed"),
    previous=("item_embeddings", "item_features", "item_content_hashes"),
    help="encode every item with the content towers + fusion (Spark batch inference)")
