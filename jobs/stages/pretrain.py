"""``pretrain``: train the multi-label tagger (MlTr or CAT backbone, ASL) on the items' images
and tags with a held-out share of the items, log its curve and held-out metrics beside the
label-frequency baseline, register it (``qarm-tagger``) and write every item's predicted tags
(``item_pred_tags``). With ``encoder.image_tower: tagger`` its backbone is the item encoder's
image tower. Items whose image does not decode, or that have no tags, are not trained on.

With ``pretrain.video.enabled`` the stage also trains the video-text model (CAMoE,
``mm_encoder/camoe.py``) on the items' (video, caption) pairs, over the per-frame features of the
item encoder's image tower and the text tower's token states, judges it on a held-out share
(text->video and video->text R@1/5/10, MdR, MnR, with and without DSL re-ranking), registers it
(``qarm-video-tower``) and writes every video's vector (``item_video_embeddings``). With
``encoder.video_tower: camoe`` its video side is the item encoder's video tower."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.stage import Stage, StageContext, StageReport


@dataclass
class PretrainReport(StageReport):
    facts: object
    curve: list
    held_out: dict
    skipped: str = ""
    video: object = None

    def text(self) -> str:
        return self.tagger_text() + (f"\n{self.video.text()}" if self.video else "")

    def tagger_text(self) -> str:
        f = self.facts
        if self.skipped:
            return f"no tagger trained: {self.skipped}"
        m = self.held_out
        return (f"tagger {f.version} ({f.backbone}, {f.tags} tags, {f.n_train} training and "
                f"{f.n_holdout} held-out images, {len(self.curve)} epochs): held-out mAP "
                f"{f.holdout_map:.4f} (label-frequency baseline {f.baseline_map:.4f}); CP "
                f"{m['CP']:.3f} CR {m['CR']:.3f} CF1 {m['CF1']:.3f} OP {m['OP']:.3f} OR "
                f"{m['OR']:.3f} OF1 {m['OF1']:.3f} at 0.5; saved {f.folder}")

    def metrics(self) -> dict[str, float]:
        out = {} if self.skipped else {
            **{f"holdout_{k}": v for k, v in self.held_out.items()},
            "baseline_mAP": self.facts.baseline_map}
        if self.video:
            out.update(self.video.metrics())
        return out


@dataclass
class VideoReport:
    facts: object
    metrics_: dict
    skipped: str = ""
    out: object = None

    def text(self) -> str:
        f = self.facts
        if self.skipped:
            return f"no video-text model trained: {self.skipped}"
        from jobs.report import text_table

        rows = [(k.replace("_dsl", " + DSL re-ranking"), m["R@1"], m["R@5"], m["R@10"],
                 m["MdR"], m["MnR"]) for k, m in self.metrics_.items()]
        return (f"video-text model {f.version} ({f.model}, {f.loss} loss, frames through "
                f"{f.image_tower}; {f.n_train} training and {f.n_holdout} held-out videos; "
                f"item vectors of width {f.dim}), held-out retrieval:\n"
                + text_table([("direction", "s"), ("R@1", ".1f"), ("R@5", ".1f"),
                              ("R@10", ".1f"), ("MdR", ".1f"), ("MnR", ".1f")], rows)
                + f"\nsaved {f.folder}")

    def metrics(self) -> dict[str, float]:
        return {f"video.{d}.{k}": v for d, m in self.metrics_.items() for k, v in m.items()}


def decoded(items, size: int):
    """(indices of the items whose image decodes and that have tags, their images)."""
    import numpy as np

    from mm_encoder.towers import decode_rgb

    keep, images = [], []
    for i, (img, tags) in enumerate(zip(items.image, items.tags)):
        if img is None or tags is None or len(tags) == 0:
            continue
        try:
            images.append(decode_rgb(img, size))
        except Exception:                  # noqa: BLE001 - ingest validated; skip, never fail
            continue
        keep.append(i)
    return np.asarray(keep, np.int64), images


def run(ctx: StageContext) -> PretrainReport:
    import hashlib
    import json

    import pyarrow as pa

    from feature_store import schemas
    from feature_store.facts import TaggerFacts
    from mm_encoder.tagger import TaggerError, predict, save_tagger, top_tags, train_tagger
    from mm_encoder.towers import to_tensor

    cfg, io = ctx.cfg.pretrain, ctx.io
    items = io.arrow("items", columns=["item_id", "tags", "image"]).to_pandas()
    keep, images = decoded(items, cfg.image_size)
    ids = items.item_id.to_numpy()[keep]
    tags = [list(items.tags.iloc[i]) for i in keep]
    schema = schemas.item_pred_tags_schema()
    try:
        if not len(keep):
            raise TaggerError("no item has both an image and tags")
        x = to_tensor(images)
        from tqdm.auto import tqdm

        with tqdm(total=cfg.epochs, desc=f"pretrain {cfg.backbone}", unit="epoch",
                  disable=None if ctx.progress else True) as bar:
            def step(c):
                bar.update(1)
                bar.set_postfix(loss=f"{c['loss']:.3f}", mAP=f"{c['holdout_mAP']:.3f}")
                ctx.tracker.metrics({"loss": c["loss"], "holdout_mAP": c["holdout_mAP"]},
                                    step=c["epoch"])

            res = train_tagger(x, tags, ids, cfg, progress=step)
    except TaggerError as e:
        facts = TaggerFacts("", cfg.backbone, "", 0, float("nan"), float("nan"), 0, 0)
        out = io.write_arrow("item_pred_tags", schema.empty_table(), schema=schema,
                             facts=facts)
        return with_video(ctx, PretrainReport({"item_pred_tags": out}, facts, [], {}, str(e)),
                          None)
    blob = json.dumps([io.manifest("items").ref, ctx.cfg.section_hash("pretrain")])
    version = "tg-" + hashlib.sha256(blob.encode()).hexdigest()[:12]
    folder = save_tagger(res, ctx.artifacts / "taggers" / version)
    probs = predict(res.model, x)
    best = top_tags(probs, res.vocab, cfg.top, cfg.threshold)
    table = pa.table({"item_id": pa.array(ids, pa.int64()),
                      "pred_tags": pa.array([[t for t, _ in b] for b in best],
                                            pa.list_(pa.string())),
                      "scores": pa.array([[s for _, s in b] for b in best],
                                         pa.list_(pa.float32()))}, schema=schema)
    facts = TaggerFacts(version, cfg.backbone, str(folder), len(res.vocab),
                        res.metrics["mAP"], res.baseline["mAP"], res.n_train, res.n_holdout)
    if ctx.cfg.mlflow.enabled:
        ctx.tracker.register_folder(str(folder), "tagger", "qarm-tagger", tags={
            "tagger_version": version, "backbone": cfg.backbone,
            "items": io.manifest("items").ref, "holdout_mAP": f"{res.metrics['mAP']:.4f}"})
    out = io.write_arrow("item_pred_tags", table, schema=schema, facts=facts)
    return with_video(ctx, PretrainReport({"item_pred_tags": out}, facts, res.curve,
                                          res.metrics), folder)


def with_video(ctx: StageContext, report: PretrainReport, tagger_folder) -> PretrainReport:
    """The report, with the video-text model trained when ``pretrain.video.enabled``."""
    if ctx.cfg.pretrain.video.enabled:
        report.video = train_video(ctx, tagger_folder)
        report.outputs["item_video_embeddings"] = report.video.out
    return report


def video_pairs(ctx: StageContext, tagger_folder):
    """(towers, Pairs of every item with a video and a caption, the image tower's name)."""
    import dataclasses

    import numpy as np

    from mm_encoder.camoe import (CAMoEError, Pairs, decode_videos, frame_features,
                                  token_states)
    from mm_encoder.item_encoder import Towers

    enc, v = ctx.cfg.encoder, ctx.cfg.pretrain.video
    if enc.image_tower not in ("mobilenet_v2", "cat", "tagger"):
        raise CAMoEError(f"the video-text model reads per-frame features of the image tower; "
                         f"encoder.image_tower {enc.image_tower!r} has none (use mobilenet_v2, "
                         "cat or tagger)")
    if enc.image_tower == "tagger":
        if tagger_folder is None:
            raise CAMoEError("encoder.image_tower is tagger, but no tagger was trained")
        enc = dataclasses.replace(enc, tagger_path=str(tagger_folder))
    items = ctx.io.arrow("items", columns=["item_id", "text", "video"]).to_pandas()
    towers = Towers(dataclasses.replace(enc, video=False))
    size = getattr(towers.image, "image_size", enc.image_size)
    ids, captions, videos = decode_videos(items.item_id, items.text, items.video, size)
    if len(ids) < 4:
        raise CAMoEError(f"{len(ids)} items have a video and a caption: too few to train on")
    fr, fm = frame_features(towers.image, videos, v.max_frames)
    tk, tm = token_states(towers.text, captions, v.max_tokens)
    return Pairs(fr, fm, tk, tm, np.asarray(ids, np.int64)), enc.image_tower


def train_video(ctx: StageContext, tagger_folder) -> VideoReport:
    import hashlib
    import json

    import numpy as np
    import pyarrow as pa
    import torch

    from feature_store import schemas
    from feature_store.facts import VideoTextFacts
    from mm_encoder.camoe import CAMoEError, save_video_text, train_video_text
    from mm_encoder.tagger import holdout_mask

    v, io = ctx.cfg.pretrain.video, ctx.io
    schema = schemas.item_video_embeddings_schema()
    try:
        pairs, image_tower = video_pairs(ctx, tagger_folder)
        from tqdm.auto import tqdm

        with tqdm(total=v.epochs, desc=f"pretrain {v.model}", unit="epoch",
                  disable=None if ctx.progress else True) as bar:
            def step(c):
                bar.update(1)
                bar.set_postfix(loss=f"{c['loss']:.3f}")
                ctx.tracker.metrics({"video_loss": c["loss"]}, step=c["epoch"])

            res = train_video_text(pairs, v, holdout_mask(pairs.item_ids, v.holdout),
                                   progress=step)
    except CAMoEError as e:
        facts = VideoTextFacts("", v.model, v.loss, "", ctx.cfg.encoder.image_tower, 0, 0, 0,
                               *[float("nan")] * 5)
        out = io.write_arrow("item_video_embeddings", schema.empty_table(), schema=schema,
                             facts=facts)
        return VideoReport(facts, {}, str(e), out)
    res.image_tower = image_tower
    blob = json.dumps([io.manifest("items").ref, ctx.cfg.section_hash("pretrain"),
                       ctx.cfg.section_hash("encoder")])
    version = "vt-" + hashlib.sha256(blob.encode()).hexdigest()[:12]
    folder = save_video_text(res, ctx.artifacts / "video_towers" / version)
    with torch.no_grad():
        vecs = torch.cat([res.model.item_vectors(pairs.frames[i:i + 512],
                                                 pairs.frame_mask[i:i + 512])
                          for i in range(0, len(pairs), 512)]).numpy().astype(np.float32)
    m = res.metrics
    facts = VideoTextFacts(version, v.model, v.loss, str(folder), image_tower, vecs.shape[1],
                           res.n_train, res.n_holdout, m["t2v"]["R@1"], m["t2v"]["R@5"],
                           m["t2v"]["MdR"], m["t2v_dsl"]["R@1"], m["v2t"]["R@1"])
    if ctx.cfg.mlflow.enabled:
        ctx.tracker.register_folder(str(folder), "video_tower", "qarm-video-tower", tags={
            "video_tower_version": version, "model": v.model, "loss": v.loss,
            "items": io.manifest("items").ref, "image_tower": image_tower,
            "holdout_t2v_R1": f"{m['t2v']['R@1']:.1f}"})
    table = pa.table({"item_id": pa.array(pairs.item_ids, pa.int64()),
                      "embedding": pa.array(list(vecs), pa.list_(pa.float32()))},
                     schema=schema)
    out = io.write_arrow("item_video_embeddings", table, schema=schema, facts=facts)
    return VideoReport(facts, m, "", out)


def config_sections(cfg) -> tuple[str, ...]:
    """The video-text model reads the encoder's image and text towers; the tagger does not."""
    return ("pretrain",) + (("encoder",) if cfg.pretrain.video.enabled else ())


def outputs(cfg) -> tuple[str, ...]:
    return ("item_pred_tags",) + (("item_video_embeddings",) if cfg.pretrain.video.enabled
                                  else ())


STAGE = Stage(
    "pretrain", run, engine="torch", inputs=("items",), outputs=outputs,
    config=config_sections, applies=lambda cfg: cfg.pretrain.enabled,
    help="train the multi-label tagger (MlTr or CAT backbone, asymmetric loss) on the items' "
         "images and tags, held-out mAP beside the label-frequency baseline, register it, "
         "write every item's predicted tags; with pretrain.video.enabled also the video-text "
         "model (CAMoE, DSL) on the items' videos and captions, held-out R@K/MdR/MnR")
