"""``pretrain``: train the multi-label tagger (MlTr or CAT backbone, ASL) on the items' images
and tags with a held-out share of the items, log its curve and held-out metrics beside the
label-frequency baseline, register it (``qarm-tagger``) and write every item's predicted tags
(``item_pred_tags``). With ``encoder.image_tower: tagger`` its backbone is the item encoder's
image tower. Items whose image does not decode, or that have no tags, are not trained on."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.stage import Stage, StageContext, StageReport


@dataclass
class PretrainReport(StageReport):
    facts: object
    curve: list
    held_out: dict
    skipped: str = ""

    def text(self) -> str:
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
        if self.skipped:
            return {}
        return {**{f"holdout_{k}": v for k, v in self.held_out.items()},
                "baseline_mAP": self.facts.baseline_map}


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
                  disable=None) as bar:
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
        return PretrainReport({"item_pred_tags": out}, facts, [], {}, str(e))
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
    return PretrainReport({"item_pred_tags": out}, facts, res.curve, res.metrics)


STAGE = Stage(
    "pretrain", run, engine="torch", inputs=("items",), outputs=("item_pred_tags",),
    config=("pretrain",), applies=lambda cfg: cfg.pretrain.enabled,
    help="train the multi-label tagger (MlTr or CAT backbone, asymmetric loss) on the items' "
         "images and tags, held-out mAP beside the label-frequency baseline, register it, "
         "write every item's predicted tags")
