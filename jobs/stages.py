"""The stages of the daily DAG, in order. Each is glue: it reads its inputs from the store, calls
the package that owns the logic, and returns the snapshots it committed plus metrics."""

from __future__ import annotations

import logging

from feature_store.snapshots import Manifest
from jobs.config import QarmConfig
from jobs.dag import StageContext, StageResult, files_fingerprint, stage

log = logging.getLogger(__name__)


def _is_synthetic(cfg: QarmConfig) -> bool:
    return cfg.source.kind == "synthetic"


@stage("world", outputs=["raw_items", "raw_events", "truth_items", "truth_users", "truth_events"],
       config=["world"], applies=_is_synthetic,
       help="generate the synthetic multi-modal world (raw items, events, ground truth)")
def world_stage(ctx: StageContext) -> StageResult:
    from pipelines import synthetic as syn

    w = ctx.cfg.world
    lat = syn.draw_latents(w)
    events, truth_events = syn.simulate_events(w, lat)
    summary = syn.world_summary(w, lat, events)
    common = dict(parents=[], config_hash=ctx.config_hash, extra=summary)
    out: dict[str, Manifest] = {}
    with ctx.store.writer("raw_items", schema=syn.RAW_ITEMS_SCHEMA, **common) as wr:
        for chunk in syn.item_chunks(w, lat):
            wr.write_arrow(chunk)
        out["raw_items"] = wr.commit()
    out["raw_events"] = ctx.store.write_table("raw_events", events, schema=syn.RAW_EVENTS_SCHEMA,
                                              **common)
    out["truth_items"] = ctx.store.write_table("truth_items", syn.truth_items_table(lat),
                                               schema=syn.TRUTH_ITEMS_SCHEMA, **common)
    out["truth_users"] = ctx.store.write_table("truth_users", syn.truth_users_table(lat),
                                               schema=syn.TRUTH_USERS_SCHEMA, **common)
    out["truth_events"] = ctx.store.write_table("truth_events", truth_events,
                                                schema=syn.TRUTH_EVENTS_SCHEMA, **common)
    report = (f"world: {summary['items']} items ({summary['cold_items']} cold), "
              f"{summary['users']} users, {summary['events']} events, CTR {summary['ctr']:.3f}, "
              f"train cut-off {summary['train_cutoff']}")
    metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
    return StageResult(out, metrics, report)


def _ingest_inputs(cfg: QarmConfig) -> tuple[str, ...]:
    return ("raw_items", "raw_events") if _is_synthetic(cfg) else ()


def _source_fingerprint(cfg: QarmConfig) -> str:
    s = cfg.source
    if s.kind == "generic":
        return files_fingerprint([s.items, s.events, s.images_dir])
    if s.kind == "movielens":
        return files_fingerprint([s.movielens_dir, s.posters_dir])
    return ""


@stage("ingest", inputs=_ingest_inputs,
       outputs=["items", "events", "quarantine", "item_id_map", "user_id_map"],
       config=["source", "ingest"], external_fingerprint=_source_fingerprint,
       help="validate raw items/events, map ids, quarantine bad rows (Spark)")
def ingest_stage(ctx: StageContext) -> StageResult:
    from pipelines.ingest import run_ingest
    from pipelines.sources import generic_source, movielens_source

    spark = ctx.spark
    kind = ctx.cfg.source.kind
    if kind == "synthetic":
        raw_items = ctx.store.read_spark(spark, "raw_items", ctx.inputs["raw_items"].snapshot_id)
        raw_events = ctx.store.read_spark(spark, "raw_events",
                                          ctx.inputs["raw_events"].snapshot_id)
    elif kind == "generic":
        raw_items, raw_events = generic_source(spark, ctx.cfg.source)
    else:
        raw_items, raw_events = movielens_source(spark, ctx.cfg.source)
    res = run_ingest(spark, ctx.store, raw_items, raw_events, ctx.cfg.source, ctx.cfg.ingest,
                     parents=ctx.parents, config_hash=ctx.config_hash)
    metrics = {f"{t}.{k}": v for t, c in res.counts.items() for k, v in c.items()}
    metrics.update({f"quarantine.{k}": v for k, v in res.quarantine_reasons.items()})
    lines = ["table    rows_in  rows_out  quarantined"]
    for t, c in res.counts.items():
        lines.append(f"{t:<8} {c['in']:>7}  {c['out']:>8}  {c['quarantined']:>11}")
    if res.quarantine_reasons:
        lines.append("quarantine reasons: " + ", ".join(
            f"{k}={v}" for k, v in sorted(res.quarantine_reasons.items())))
    lines.append(f"label mode: {res.label_mode}")
    return StageResult(res.manifests, metrics, "\n".join(lines))


@stage("embed", inputs=["items"], outputs=["item_embeddings", "item_features", "embed_quarantine"],
       config=["encoder", "embed"],
       help="encode every item with the content towers + fusion (Spark batch inference)")
def embed_stage(ctx: StageContext) -> StageResult:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from feature_store import schemas
    from mm_encoder.item_encoder import ItemEncoder
    from pipelines.embed import embed_items_spark
    from pipelines.ingest import RowAccountingError, write_snapshot

    cfg = ctx.cfg
    encoder = ItemEncoder(cfg.encoder)
    folder = encoder.save(str(cfg.root / "artifacts" / "encoders"))
    ctx.tracker.artifact_dir(folder, "encoder")
    spark = ctx.spark
    items = ctx.store.read_spark(spark, "items", ctx.inputs["items"].snapshot_id)
    out, stats = embed_items_spark(spark, items, encoder, batch_size=cfg.encoder.batch_size,
                                   threads_per_task=cfg.embed.threads_per_task,
                                   partitions=cfg.embed.partitions)
    out = out.persist(StorageLevel.MEMORY_AND_DISK)
    n_in = ctx.inputs["items"].row_count
    common = dict(parents=ctx.parents, config_hash=ctx.config_hash)
    emb = write_snapshot(
        ctx.store, "item_embeddings",
        out.where(F.col("_reason").isNull()).select("item_id", "embedding", "encoder_version"),
        schemas.item_embeddings_schema(cfg.encoder.dim),
        extra={"dim": cfg.encoder.dim, "encoder_version": encoder.version,
               "encoder_artifact": folder}, **common)
    feats = write_snapshot(
        ctx.store, "item_features",
        out.where(F.col("_reason").isNull()).select("item_id", "features", "present"),
        schemas.item_features_schema(),
        extra={"dims": encoder.towers.dims(), "encoder_version": encoder.version}, **common)
    bad = out.where(F.col("_reason").isNotNull()).select(
        F.lit("items").alias("source_table"), F.col("_reason").alias("reason"),
        F.col("_detail").alias("detail"),
        F.to_json(F.struct("item_id")).alias("row"))
    q = write_snapshot(ctx.store, "embed_quarantine", bad.coalesce(1),
                       schemas.quarantine_schema(), **common)
    st = stats()
    out.unpersist()
    if n_in != emb.row_count + q.row_count:
        raise RowAccountingError(f"embed: {n_in} items in != {emb.row_count} embedded + "
                                 f"{q.row_count} quarantined")
    metrics = {"items_in": n_in, "embedded": emb.row_count, "quarantined": q.row_count,
               "encoder_loads": st.loads, "worker_peak_rss_mb": st.peak_rss_mb}
    report = (f"embedded {emb.row_count} of {n_in} items (quarantined {q.row_count}) with "
              f"encoder {encoder.version} (D={cfg.encoder.dim}, text={cfg.encoder.text_tower}, "
              f"image={cfg.encoder.image_tower}); encoder loaded {st.loads}x across Python "
              f"workers; artifact {folder}")
    return StageResult({"item_embeddings": emb, "item_features": feats, "embed_quarantine": q},
                       metrics, report)


def train_end(cfg: QarmConfig, events_df):
    """The training / evaluation boundary (a UTC datetime) from ``split``."""
    import datetime as dt

    from pyspark.sql import functions as F

    if cfg.split.train_end:
        t = dt.datetime.fromisoformat(cfg.split.train_end.replace("Z", "+00:00"))
        return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)
    row = events_df.agg(F.min("ts").alias("lo"), F.max("ts").alias("hi")).first()
    lo, hi = row["lo"], row["hi"]
    lo = lo if lo.tzinfo else lo.replace(tzinfo=dt.timezone.utc)
    hi = hi if hi.tzinfo else hi.replace(tzinfo=dt.timezone.utc)
    return lo + (hi - lo) * cfg.split.train_share


@stage("pairs", inputs=["events", "item_embeddings"], outputs=["item_pairs"],
       config=["pairs", "split"],
       help="mine behaviour pairs from the training period: Swing, ItemCF, U2I triggers (Spark)")
def pairs_stage(ctx: StageContext) -> StageResult:
    from pyspark.sql import functions as F

    from feature_store import schemas
    from pipelines.ingest import write_snapshot
    from pipelines.pairs import mine_pairs

    spark = ctx.spark
    events = ctx.store.read_spark(spark, "events", ctx.inputs["events"].snapshot_id)
    emb = ctx.store.read_spark(spark, "item_embeddings",
                               ctx.inputs["item_embeddings"].snapshot_id)
    end = train_end(ctx.cfg, events)
    pairs = mine_pairs(events, emb, end, ctx.cfg.pairs)
    out = write_snapshot(ctx.store, "item_pairs", pairs, schemas.item_pairs_schema(),
                         parents=ctx.parents, config_hash=ctx.config_hash,
                         extra={"train_end": end.isoformat()})
    by_source = {r["source"]: (r["n"], r["mean"]) for r in
                 ctx.store.read_spark(spark, "item_pairs", out.snapshot_id)
                 .groupBy("source").agg(F.count("*").alias("n"), F.avg("score").alias("mean"))
                 .collect()}
    lines = [f"training period ends {end.isoformat()}", "source   pairs   mean score"]
    lines += [f"{s:<7} {n:>6}   {m:.4f}" for s, (n, m) in sorted(by_source.items())]
    metrics = {f"pairs.{s}": n for s, (n, _) in by_source.items()}
    return StageResult({"item_pairs": out}, metrics, "\n".join(lines))


@stage("align", inputs=["item_pairs", "item_features", "item_embeddings", "events"],
       outputs=["aligned_item_embeddings"], config=["align", "split", "encoder"],
       help="train the fusion on behaviour pairs, re-embed every item, evaluate raw vs aligned")
def align_stage(ctx: StageContext) -> StageResult:
    import numpy as np
    import pyarrow as pa

    from feature_store import schemas
    from mm_encoder.align import train_alignment
    from mm_encoder.item_encoder import ItemEncoder, unpack_features
    from pipelines.embed import reembed_features_spark
    from pipelines.ingest import RowAccountingError, write_snapshot

    cfg, store, spark = ctx.cfg, ctx.store, ctx.spark
    raw_m = ctx.inputs["item_embeddings"]
    encoder = ItemEncoder.load(raw_m.extra["encoder_artifact"])
    feats_t = store.read_arrow("item_features",
                               ctx.inputs["item_features"].snapshot_id).sort_by("item_id")
    ids = feats_t.column("item_id").to_numpy()
    n = len(ids)
    feats = feats_t.column("features").combine_chunks().flatten().to_numpy(
        zero_copy_only=False).reshape(n, -1).astype(np.float32)
    present = np.asarray(feats_t.column("present").combine_chunks().flatten().to_numpy(
        zero_copy_only=False), dtype=bool).reshape(n, -1)
    features = unpack_features(feats, present, encoder.towers.dims())
    row = {int(i): k for k, i in enumerate(ids)}
    pairs = store.read_arrow("item_pairs", ctx.inputs["item_pairs"].snapshot_id).to_pandas()
    pairs = pairs[pairs.source.isin(cfg.align.sources)]
    pairs = pairs[pairs.src.isin(row) & pairs.dst.isin(row)]
    # Spark returns rows in no fixed order: sort so the seeded training sees the same batches.
    pairs = pairs.sort_values(["source", "src", "dst"], kind="stable")
    src = pairs.src.map(row).to_numpy()
    dst = pairs.dst.map(row).to_numpy()
    n_tune = cfg.align.tune_text_layers
    texts = _item_texts(ctx, ids) if n_tune else None
    fusion, history = train_alignment(encoder.fusion, features, src, dst, cfg.align,
                                      text_tower=encoder.towers.text, texts=texts)
    text_state = None
    features_m = ctx.inputs["item_features"]
    if n_tune:
        text_state = encoder.towers.text.last_layers(n_tune)
        # The text tower changed: recompute every item's text features before re-embedding.
        feats = _replace_text_features(encoder, feats, texts)
        features_m = store.write_table(
            "aligned_item_features", pa.table({
                "item_id": pa.array(ids, pa.int64()),
                "features": pa.FixedSizeListArray.from_arrays(pa.array(feats.ravel()),
                                                              feats.shape[1])
                .cast(pa.list_(pa.float32())),
                "present": pa.FixedSizeListArray.from_arrays(pa.array(present.ravel()),
                                                             present.shape[1])
                .cast(pa.list_(pa.bool_()))}),
            schema=schemas.item_features_schema(), parents=ctx.parents,
            config_hash=ctx.config_hash, extra={"dims": encoder.towers.dims()})
    aligned = ItemEncoder(encoder.cfg, fusion.state_dict(), towers=encoder.towers,
                          text_state=text_state)
    folder = aligned.save(str(cfg.root / "artifacts" / "encoders"))
    ctx.tracker.artifact_dir(folder, "aligned_encoder")
    for h in history:
        ctx.tracker.metrics({"align.contrastive": h["contrastive"],
                             "align.content": h["content"]})
    ctx.tracker.register_torch_model(
        fusion, "aligned_fusion", "qarm-item-encoder",
        tags={"encoder_version": aligned.version, "raw_encoder_version": encoder.version,
              "pairs_snapshot": ctx.inputs["item_pairs"].ref})

    out_df = reembed_features_spark(spark, store.read_spark(
        spark, features_m.table, features_m.snapshot_id), aligned,
        partitions=cfg.embed.partitions, threads_per_task=cfg.embed.threads_per_task)
    out = write_snapshot(store, "aligned_item_embeddings", out_df,
                         schemas.item_embeddings_schema(cfg.encoder.dim),
                         parents=ctx.parents, config_hash=ctx.config_hash,
                         extra={"dim": cfg.encoder.dim, "encoder_version": aligned.version,
                                "encoder_artifact": folder,
                                "raw_encoder_version": encoder.version,
                                "pairs_snapshot": ctx.inputs["item_pairs"].ref})
    if out.row_count != n:
        raise RowAccountingError(f"align: {n} items with features != {out.row_count} embedded")

    from jobs.evaluate_alignment import evaluate_alignment

    events = store.read_spark(spark, "events", ctx.inputs["events"].snapshot_id)
    end = train_end(cfg, events)
    table, metrics = evaluate_alignment(ctx, events, end, raw_m, out)
    metrics.update({"align.pairs": int(len(src)),
                    "align.final_contrastive": history[-1]["contrastive"]})
    report = (f"aligned encoder {aligned.version} trained on {len(src)} pairs "
              f"({', '.join(cfg.align.sources)}; loss {cfg.align.loss}, "
              f"{cfg.align.epochs} epochs: contrastive {history[0]['contrastive']:.3f} -> "
              f"{history[-1]['contrastive']:.3f}); {out.row_count} items re-embedded\n" + table)
    return StageResult({"aligned_item_embeddings": out}, metrics, report)


def _item_texts(ctx: StageContext, ids) -> list[str]:
    """The encoder's text input for each item id, in ``ids`` order."""
    from mm_encoder.item_encoder import item_text

    m = ctx.upstream("items")
    t = ctx.store.read_arrow("items", m.snapshot_id,
                             columns=["item_id", "title", "text", "tags"]).to_pandas()
    t = t.set_index("item_id").loc[ids]
    return [item_text(a, b, c) for a, b, c in zip(t.title, t.text, t.tags)]


def _replace_text_features(encoder, feats, texts, batch: int = 256):
    """``feats`` with its text block recomputed by the (tuned) text tower."""
    import numpy as np

    dt = encoder.towers.dims()["text"]   # text is the first block of the packed features
    out = feats.copy()
    for s in range(0, len(texts), batch):
        out[s:s + batch, :dt] = encoder.towers.text(texts[s:s + batch]).numpy()
    return out.astype(np.float32)


def _quantize(ctx: StageContext, src, out_table: str, codebook_version=None):
    """Fit (or load) a codebook on the embeddings snapshot ``src`` and code every item in Spark.

    Returns (output manifest, codebook, metrics dict, fitted?, fit sample size)."""
    import numpy as np

    from feature_store import schemas
    from pipelines.ingest import RowAccountingError, write_snapshot
    from pipelines.quantize import assign_codes_spark, sample_embeddings
    from quantizer.codebook import Codebook
    from quantizer.metrics import codebook_metrics
    from quantizer.rq import ResidualKMeans
    from quantizer.vq import NeighbourCodes, exact_overlap

    q = ctx.cfg.quantize
    root = str(ctx.cfg.root / "artifacts" / "codebooks")
    spark = ctx.spark
    emb = ctx.store.read_spark(spark, src.table, src.snapshot_id)
    ids, vecs = sample_embeddings(emb, src.row_count, q.fit_sample, q.rq.seed)
    if codebook_version:
        cb = Codebook.load(root, codebook_version)
        fitted = False
    else:
        rq = ResidualKMeans(q.rq).fit(vecs)
        vq = NeighbourCodes(q.vq).fit(ids, vecs)
        cb = Codebook(rq, vq, training_snapshot=src.ref)
        cb.version = cb.content_version()
        fitted = True
    rq_codes = cb.rq.encode(vecs)  # the metrics need RQ codes only
    pick = np.random.default_rng(0).choice(len(ids), min(len(ids), q.overlap_sample),
                                           replace=False)
    metrics = codebook_metrics(cb.rq, vecs, rq_codes,
                               exact_overlap(cb.vq, ids[pick], vecs[pick]))
    if fitted:
        cb.metrics = metrics
        try:
            folder = cb.save(root)
        except FileExistsError:   # the same content was fitted before: that version is it
            folder = f"{root}/{cb.version}"
        ctx.tracker.artifact_dir(folder, f"codebook_{out_table}")
    codes = assign_codes_spark(spark, emb, cb, partitions=q.partitions,
                               threads_per_task=q.threads_per_task)
    levels = cb.rq.centroids.shape[0]
    if q.disambiguate:
        from pipelines.quantize import disambiguate

        codes = disambiguate(codes)
        levels += 1
    out = write_snapshot(ctx.store, out_table, codes, schemas.item_codes_schema(levels),
                         parents=ctx.parents, config_hash=ctx.config_hash,
                         extra={"codebook_version": cb.version, "fitted": fitted,
                                "embeddings": src.ref, "disambiguated": q.disambiguate})
    if out.row_count != src.row_count:
        raise RowAccountingError(f"{out_table}: {src.row_count} embeddings in != "
                                 f"{out.row_count} coded")
    return out, cb, metrics, fitted, len(ids)


def _codebook_report(out, cb, metrics, fitted, n_fit) -> str:
    from quantizer.metrics import format_table

    levels = cb.rq.centroids.shape[0]
    how = f"fitted on {n_fit} embeddings" if fitted else "existing, assign-only"
    return (f"codebook {cb.version} ({how}; RQ {levels} x {cb.rq.cfg.codes}, "
            f"{cb.rq.fit_record.get('method', '')}; VQ k={cb.vq.cfg.k} over a pool of "
            f"{len(cb.vq.pool_ids)} items, index {cb.vq.cfg.index}); {out.row_count} items "
            f"coded\n" + format_table(metrics))


@stage("quantize", inputs=["aligned_item_embeddings"], outputs=["item_codes"],
       config=["quantize"],
       help="fit VQ/RQ codebooks on the aligned embeddings and code every item (Spark)")
def quantize_stage(ctx: StageContext) -> StageResult:
    from quantizer.metrics import flat_metrics

    out, cb, metrics, fitted, n_fit = _quantize(ctx, ctx.inputs["aligned_item_embeddings"],
                                                "item_codes", ctx.cfg.quantize.codebook)
    return StageResult({"item_codes": out}, {**flat_metrics(metrics), "coded": out.row_count,
                                             "fitted": int(fitted)},
                       _codebook_report(out, cb, metrics, fitted, n_fit))


@stage("quantize_raw", inputs=["item_embeddings", "item_codes", "events"],
       outputs=["item_codes_raw"], config=["quantize", "split"],
       applies=lambda cfg: cfg.quantize.raw_arm,
       help="codes from the raw (unaligned) embeddings: the codes_raw arm, and how much "
            "held-out behaviour aligned vs raw codes share")
def quantize_raw_stage(ctx: StageContext) -> StageResult:
    from quantizer.metrics import flat_metrics

    out, cb, metrics, fitted, n_fit = _quantize(ctx, ctx.inputs["item_embeddings"],
                                                "item_codes_raw")
    table, shared = _behaviour_sharing(ctx, ctx.inputs["item_codes"], out)
    report = _codebook_report(out, cb, metrics, fitted, n_fit) + "\n" + table
    return StageResult({"item_codes_raw": out},
                       {**flat_metrics(metrics), **shared, "coded": out.row_count}, report)


def _behaviour_sharing(ctx: StageContext, aligned_m, raw_m) -> tuple[str, dict]:
    """Share of held-out next-click pairs (evaluation period) whose two items share the RQ
    prefix of length 1 and 2, with aligned vs raw codes; and the same for random pairs."""
    import numpy as np

    from pipelines.pairs import next_positive_pairs

    spark = ctx.spark
    events = ctx.store.read_spark(spark, "events", ctx.inputs["events"].snapshot_id)
    end = train_end(ctx.cfg, events)
    pairs = next_positive_pairs(events, end).select("src", "dst").toPandas()
    rng = np.random.default_rng(0)
    lines = ["held-out next-click pairs sharing an RQ prefix   aligned     raw   (random pairs: "
             "aligned, raw)"]
    metrics = {}
    codes = {}
    for name, m in (("aligned", aligned_m), ("raw", raw_m)):
        t = ctx.store.read_arrow(m.table, m.snapshot_id)
        ids = t.column("item_id").to_numpy()
        rq = np.stack(t.column("rq").to_numpy(zero_copy_only=False))
        codes[name] = (dict(zip(ids.tolist(), range(len(ids)))), rq)
    for prefix in (1, 2):
        vals = {}
        for name, (pos, rq) in codes.items():
            keep = pairs[pairs.src.isin(pos) & pairs.dst.isin(pos)]
            a, b = rq[keep.src.map(pos).to_numpy()], rq[keep.dst.map(pos).to_numpy()]
            share = float((a[:, :prefix] == b[:, :prefix]).all(1).mean()) if len(keep) else 0.0
            ra, rb = rng.integers(0, len(rq), (2, max(len(keep), 1000)))
            base = float((rq[ra, :prefix] == rq[rb, :prefix]).all(1).mean())
            vals[name] = (share, base)
            metrics[f"heldout_share_prefix{prefix}.{name}"] = share
            metrics[f"random_share_prefix{prefix}.{name}"] = base
        lines.append(f"  prefix length {prefix} ({len(pairs)} pairs){'':<17}{vals['aligned'][0]:>7.4f} "
                     f"{vals['raw'][0]:>7.4f}   ({vals['aligned'][1]:.4f}, {vals['raw'][1]:.4f})")
    return "\n".join(lines), metrics


# ----------------------------------------------------------------------------- ranker


def _examples_inputs(cfg: QarmConfig) -> tuple[str, ...]:
    ins = ["events", "items", "item_codes"]
    if cfg.quantize.raw_arm:
        ins.append("item_codes_raw")
    if cfg.examples.frozen_embedding:
        ins.append("item_embeddings")
    return tuple(ins)


@stage("examples", inputs=_examples_inputs, outputs=["train_examples", "eval_examples"],
       config=["examples", "split"],
       help="ranker examples: time split, history before each event, target codes, cold flags, "
            "sampled negatives for implicit feedback (Spark)")
def examples_stage(ctx: StageContext) -> StageResult:
    from pyspark.sql import functions as F

    from feature_store import schemas
    from pipelines.examples import ExamplesError, build_examples
    from pipelines.ingest import RowAccountingError, write_snapshot

    cfg, store, spark = ctx.cfg, ctx.store, ctx.spark

    def read(table):
        return store.read_spark(spark, table, ctx.inputs[table].snapshot_id)

    events = read("events")
    end = train_end(cfg, events)
    codes_raw = read("item_codes_raw") if "item_codes_raw" in ctx.inputs else None
    frozen = read("item_embeddings") if "item_embeddings" in ctx.inputs else None
    train, evals, facts = build_examples(events, read("items"), read("item_codes"), codes_raw,
                                         frozen, end, cfg.examples)
    stats = {}
    for name, df in (("train", train), ("eval", evals)):
        r = df.agg(F.count("*").alias("n"), F.sum(F.col("sampled").cast("int")).alias("sampled"),
                   F.sum("label").alias("pos"), F.avg(F.size("hist_item_ids")).alias("hist"),
                   F.sum(F.col("cold").cast("int")).alias("cold"),
                   F.max(F.array_max("rq")).alias("max_rq"),
                   F.max(F.array_max("rq_raw")).alias("max_rq_raw"),
                   F.avg(F.size("vq")).alias("vq"), F.max("user_id").alias("max_user")).first()
        stats[name] = r.asDict()
    for name, s in stats.items():
        if not s["n"]:
            raise ExamplesError(f"no {name} examples: the split (train_end / train_share) leaves "
                                f"the {name} period empty")
    codes_per_level = int(max(s[k] or 0 for s in stats.values()
                              for k in ("max_rq", "max_rq_raw"))) + 1
    facts.update({"codes_per_level": codes_per_level,
                  "n_users": int(max(s["max_user"] for s in stats.values())) + 1,
                  "mean_history": float(stats["train"]["hist"] or 0.0),
                  "mean_vq": float(stats["train"]["vq"] or 0.0),
                  "frozen_dim": int(ctx.inputs["item_embeddings"].extra["dim"]) if frozen is not None
                  else 0,
                  "codebook_version": ctx.inputs["item_codes"].extra.get("codebook_version")})
    schema = schemas.examples_schema(facts["levels"])
    common = dict(parents=ctx.parents, config_hash=ctx.config_hash, extra=facts)
    out = {"train_examples": write_snapshot(store, "train_examples", train, schema, **common),
           "eval_examples": write_snapshot(store, "eval_examples", evals, schema, **common)}
    n_events = ctx.inputs["events"].row_count
    observed = sum(s["n"] - (s["sampled"] or 0) for s in stats.values())
    if observed != n_events or sum(m.row_count for m in out.values()) != \
            sum(s["n"] for s in stats.values()):
        raise RowAccountingError(f"examples: {n_events} events in != {observed} observed "
                                 "examples out")
    lines = [f"training period ends {end.isoformat()}; history: last "
             f"{cfg.examples.history_len} positives strictly before each event",
             "split   examples  positives  sampled negatives  cold-item examples  mean history"]
    metrics = {}
    for name, s in stats.items():
        lines.append(f"{name:<6} {s['n']:>9} {int(s['pos']):>10} {int(s['sampled'] or 0):>18} "
                     f"{int(s['cold']):>19} {s['hist'] or 0:>13.2f}")
        metrics.update({f"{name}.examples": s["n"], f"{name}.positives": int(s["pos"]),
                        f"{name}.sampled": int(s["sampled"] or 0), f"{name}.cold": int(s["cold"]),
                        f"{name}.mean_history": float(s["hist"] or 0)})
    lines.append("negatives: " + ("sampled (implicit feedback), "
                                  f"{cfg.examples.neg_ratio} per positive"
                                  if facts["implicit_negatives"] else "observed (labelled events)"))
    return StageResult(out, metrics, "\n".join(lines))


def _arm_spec(cfg: QarmConfig, arm: str, facts: dict):
    from recsys.features import build_spec

    return build_spec(arm, dim=cfg.train.model.dim, history_len=facts["history_len"],
                      levels=facts["levels"], codes_per_level=facts["codes_per_level"],
                      n_items=facts["n_items"], n_users=facts["n_users"],
                      item_hash_size=cfg.train.model.item_hash_size,
                      user_hash_size=cfg.train.model.user_hash_size,
                      frozen_dim=facts["frozen_dim"], mean_history=facts["mean_history"],
                      vq_k=max(facts["mean_vq"], 1.0))


@stage("train", inputs=["train_examples", "eval_examples"], outputs=["ranker_predictions"],
       config=["train"],
       help="train the TorchRec ranker for every ablation arm (sharded, fused optimizers, "
            "local ranks or torchrun), score the evaluation examples, register in MLflow")
def train_stage(ctx: StageContext) -> StageResult:
    import pyarrow as pa

    from feature_store import schemas
    from recsys.features import FeatureSpecError
    from recsys.runner import load_trained, train_arm

    cfg = ctx.cfg
    m_tr, m_ev = ctx.inputs["train_examples"], ctx.inputs["eval_examples"]
    facts = m_tr.extra
    if "codes_raw" in cfg.train.arms and not facts.get("raw_codes"):
        raise FeatureSpecError("arm codes_raw needs raw codes in the examples "
                               "(quantize.raw_arm=true), or drop it from train.arms")
    aligned = ctx.upstream("aligned_item_embeddings")
    encoder_version = aligned.extra.get("encoder_version") if aligned else None
    files = {m.table: [f"{m.path}/{f}" for f in m.files] for m in (m_tr, m_ev)}
    runs = cfg.root / "runs" / ctx.ds / "train"
    frozen_table = _frozen_table(ctx, m_tr, runs) if facts.get("frozen") else ""
    preds, lines, metrics = [], [], {}
    lines.append(f"{'arm':<13} {'steps':>6} {'final loss':>10} {'examples/s':>11}  registered")
    for arm in cfg.train.arms:
        spec = _arm_spec(cfg, arm, facts)
        res = train_arm(spec, cfg.train, files["train_examples"], files["eval_examples"],
                        runs / arm.replace("+", "_"), frozen_table=frozen_table)
        curve = res.result["loss_curve"]
        every = max(1, len(curve) // 200)
        for step in range(0, len(curve), every):
            ctx.tracker.metrics({f"{arm}.train_loss": curve[step]}, step=step)
        tail = float(sum(curve[-20:]) / len(curve[-20:])) if curve else float("nan")
        metrics.update({f"{arm}.final_loss": tail, f"{arm}.steps": res.result["steps"],
                        f"{arm}.examples_per_s": res.result["examples_per_second"]})
        version = None
        if cfg.train.register:
            version = ctx.tracker.register_torch_model(
                load_trained(res.out_dir), f"ranker_{arm.replace('+', '_')}", "qarm-ranker",
                tags={"arm": arm, "codebook_version": facts.get("codebook_version"),
                      "encoder_version": encoder_version, "examples": m_tr.ref,
                      "world_size": res.result["world"]})
        preds.append(res.predictions)
        lines.append(f"{arm:<13} {res.result['steps']:>6} {tail:>10.4f} "
                     f"{res.result['examples_per_second']:>11.0f}  "
                     f"{'qarm-ranker v' + version if version else '-'}")
    table = pa.concat_tables(preds)
    out = ctx.store.write_table("ranker_predictions", table, schema=schemas.predictions_schema(),
                                parents=ctx.parents, config_hash=ctx.config_hash,
                                extra={"arms": cfg.train.arms, "ranks": cfg.train.ranks,
                                       "codebook_version": facts.get("codebook_version"),
                                       "encoder_version": encoder_version})
    lines.append(f"ranks: {cfg.train.ranks} ({cfg.train.launcher}, {cfg.train.device}); global "
                 f"batch {cfg.train.batch_size}; {cfg.train.epochs} epochs; runs in "
                 f"{cfg.root / 'runs' / ctx.ds / 'train'}")
    return StageResult({"ranker_predictions": out}, metrics, "\n".join(lines))


def _frozen_table(ctx: StageContext, examples_m, folder) -> str:
    """The frozen content vectors the examples were built with, as an .npy by item id (rows of
    items without an embedding are zero)."""
    import numpy as np

    from jobs.evaluate_alignment import read_vectors

    ref = next(p for p in examples_m.parents if p.startswith("item_embeddings@"))
    m = ctx.store.resolve(ref)
    ids, vecs = read_vectors(ctx.store, m)
    table = np.zeros((examples_m.extra["n_items"], vecs.shape[1]), np.float32)
    table[ids] = vecs
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"frozen_table_{m.snapshot_id}.npy"
    np.save(path, table)
    return str(path)


def _evaluate_inputs(cfg: QarmConfig) -> tuple[str, ...]:
    return ("ranker_predictions",) + (("truth_events", "item_id_map", "user_id_map")
                                      if _is_synthetic(cfg) else ())


@stage("evaluate", inputs=_evaluate_inputs, outputs=["ranker_metrics"], config=[],
       help="AUC, GAUC, LogLoss, NE per arm on all evaluation examples and the cold-item slice "
            "(the ablation table), with the synthetic ground truth as the ceiling")
def evaluate_stage(ctx: StageContext) -> StageResult:
    from jobs.evaluate_ranker import evaluate_predictions

    table, rows, metrics = evaluate_predictions(ctx)
    out = ctx.store.write_table("ranker_metrics", rows, parents=ctx.parents,
                                config_hash=ctx.config_hash)
    ctx.tracker.metrics(metrics)
    ctx.tracker.artifact_text(table, "ablation.txt")
    return StageResult({"ranker_metrics": out}, metrics, table)
