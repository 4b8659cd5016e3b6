"""``align``: train the item encoder's fusion on behaviour pairs, re-embed every item, and compare
raw with aligned embeddings on held-out behaviour (and, on the synthetic world, ground truth)."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.report import text_table
from jobs.stage import Stage, StageContext, StageReport
from jobs.stages.embed import has_dated_tags, item_content
from jobs.stages.world import is_synthetic

K = 10


def inputs(cfg) -> tuple[str, ...]:
    ins = ("item_pairs", "item_features", "item_embeddings", "split_events")
    if cfg.align.tune_text_layers:     # the texts the tuned text tower reads, as embed read them
        ins += ("items",) + (("item_tags",) if has_dated_tags(cfg) else ())
    if is_synthetic(cfg):
        ins += ("truth_items", "item_id_map")
    if cfg.daily.incremental:
        ins += ("daily_plan",)
    return ins


def outputs(cfg) -> tuple[str, ...]:
    return ("aligned_item_embeddings",) + (
        ("aligned_item_features",) if cfg.align.tune_text_layers else ())


@dataclass
class AlignReport(StageReport):
    encoder_version: str
    pairs: int
    sources: list[str]
    loss: str
    history: list[dict]
    reembedded: int
    retrieval: list[dict]
    purity: list[dict]
    #: Daily runs without a refit: the previous day's aligned encoder, not trained today.
    kept: bool = False

    def text(self) -> str:
        h = self.history
        head = (f"kept the previous day's aligned encoder {self.encoder_version} (no refit); "
                f"{self.reembedded} items embedded with it" if self.kept else
                f"aligned encoder {self.encoder_version} trained on {self.pairs} pairs "
                f"({', '.join(self.sources)}; loss {self.loss}, {len(h)} epochs: contrastive "
                f"{h[0]['contrastive']:.3f} -> {h[-1]['contrastive']:.3f}); {self.reembedded} "
                f"items re-embedded")
        lines = [head,
                 text_table([("held-out behaviour", "s"), ("pairs", "d"),
                             (f"Recall@{K} raw", ".4f"), ("aligned", ".4f"),
                             (f"NDCG@{K} raw", ".4f"), ("aligned", ".4f")],
                            [(r["pairs"], r["n"], r["recall_raw"], r["recall_aligned"],
                              r["ndcg_raw"], r["ndcg_aligned"]) for r in self.retrieval])]
        if self.purity:
            from pipelines.synthetic import ATTRIBUTE_ROLES

            lines.append(f"synthetic ground truth: {K}-NN purity\n" + text_table(
                [("attribute", "s"), ("role", "s"), ("raw", ".4f"), ("aligned", ".4f"),
                 ("chance", ".4f")],
                [(p["attribute"], ATTRIBUTE_ROLES[p["attribute"]], p["raw"], p["aligned"],
                  p["chance"]) for p in self.purity]))
        return "\n".join(lines)

    def metrics(self) -> dict[str, float]:
        m = {"align.pairs": self.pairs, "align.kept": int(self.kept)}
        if self.history:
            m["align.final_contrastive"] = self.history[-1]["contrastive"]
        for r in self.retrieval:
            key = r["pairs"].replace(" ", "_").replace("-", "_")
            for which in ("raw", "aligned"):
                m[f"{key}.{which}.recall_at_{K}"] = r[f"recall_{which}"]
                m[f"{key}.{which}.ndcg_at_{K}"] = r[f"ndcg_{which}"]
        for p in self.purity:
            m[f"purity.{p['attribute']}.raw"] = p["raw"]
            m[f"purity.{p['attribute']}.aligned"] = p["aligned"]
        return m


def run(ctx: StageContext) -> AlignReport:
    import numpy as np
    import pyarrow as pa

    from feature_store import schemas
    from feature_store.arrays import ids_and_matrix, list_matrix, matrix_column
    from feature_store.facts import EmbeddingFacts, FeatureFacts
    from mm_encoder.align import align_encoder, item_texts, pair_rows
    from mm_encoder.evaluation import compare_purity, compare_retrieval
    from mm_encoder.item_encoder import ItemEncoder
    from pipelines.accounting import check_rows
    from pipelines.embed import reembed_features_spark
    from pipelines.pairs import heldout_pair_sets

    from feature_store.facts import DailyPlanFacts

    cfg, io, spark = ctx.cfg, ctx.io, ctx.spark
    raw_facts = io.facts("item_embeddings", EmbeddingFacts)
    feats_t = io.arrow("item_features").sort_by("item_id")
    ids = feats_t.column("item_id").to_numpy()
    src, dst = pair_rows(io.arrow("item_pairs").to_pandas(), ids, cfg.align.sources)
    plan = io.facts("daily_plan", DailyPlanFacts) if io.has("daily_plan") else None
    kept = plan is not None and not plan.refit
    if kept:      # a daily run without drift: the previous day's encoder codes the new items
        encoder = ItemEncoder.load(raw_facts.encoder_artifact)
        aligned, history = ItemEncoder.load(plan.encoder_artifact, encoder.towers), []
        folder = plan.encoder_artifact
        result = None
    else:
        encoder = ItemEncoder.load(raw_facts.encoder_artifact)
        feats = list_matrix(feats_t.column("features"), np.float32)
        present = list_matrix(feats_t.column("present"), bool)
        texts = (item_texts(item_content(ctx).select("item_id", "title", "text",
                                                     "tags").toPandas(), ids)
                 if cfg.align.tune_text_layers else None)
        result = align_encoder(encoder, feats, present, src, dst, cfg.align, texts,
                               progress=ctx.progress)
        aligned, history = result.encoder, result.history
        folder = aligned.save(str(ctx.artifacts / "encoders"))
        for h in history:
            ctx.tracker.metrics({"align.contrastive": h["contrastive"],
                                 "align.content": h["content"]})
        # Weights plus config (encoder.pt holds tensors only, config.json the settings).
        ctx.tracker.register_folder(
            folder, "encoder", "qarm-item-encoder",
            tags={"encoder_version": aligned.version, "raw_encoder_version": encoder.version,
                  "pairs_snapshot": io.manifest("item_pairs").ref})

    out = {}
    features_df = io.spark(spark, "item_features")
    if result is not None and result.features is not None:
        tuned = pa.table({"item_id": feats_t.column("item_id"),
                          "features": matrix_column(result.features),
                          "present": matrix_column(present, pa.bool_())})
        out["aligned_item_features"] = io.write_arrow(
            "aligned_item_features", tuned, schema=schemas.item_features_schema(),
            facts=FeatureFacts(encoder.towers.dims(), aligned.version))
        features_df = io.written_spark(spark, out["aligned_item_features"])
    emb_df = reembed_features_spark(spark, features_df, aligned, partitions=cfg.embed.partitions,
                                    threads_per_task=cfg.embed.threads_per_task)
    m = out["aligned_item_embeddings"] = io.write_spark(
        "aligned_item_embeddings", emb_df, schemas.item_embeddings_schema(cfg.encoder.dim),
        facts=EmbeddingFacts(cfg.encoder.dim, aligned.version, folder,
                             raw_encoder_version=encoder.version,
                             pairs_snapshot=plan.encoder_pairs if kept
                             else io.manifest("item_pairs").ref))
    check_rows("align: items with features re-embedded", len(ids), m.row_count)

    # Raw vs aligned on behaviour the alignment never saw.
    pair_sets = {name: (p.src.to_numpy(), p.dst.to_numpy())
                 for name, p in heldout_pair_sets(io.spark(spark, "split_events")).items()}
    raw = ids_and_matrix(io.arrow("item_embeddings"), "embedding")
    ali = ids_and_matrix(io.written_arrow(m), "embedding")
    purity = []
    if io.has("truth_items"):
        from pipelines.synthetic import truth_attributes

        labels = truth_attributes(io.arrow("truth_items").to_pandas(),
                                  io.arrow("item_id_map").to_pandas(), raw[0])
        purity = compare_purity(raw[1], ali[1], labels, K)
    return AlignReport(out, aligned.version, int(len(src)), list(cfg.align.sources),
                       cfg.align.loss, history, m.row_count,
                       compare_retrieval(raw, ali, pair_sets, K), purity, kept)


STAGE = Stage(
    "align", run, engine="spark", inputs=inputs, outputs=outputs, config=("align", "encoder"),
    help="train the fusion on behaviour pairs, re-embed every item, evaluate raw vs aligned")
