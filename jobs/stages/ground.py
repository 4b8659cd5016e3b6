"""``ground``: train the GMU video-grounding model (``mm_encoder/gmu.py``) on a grounding set
(synthetic untrimmed videos, or a Charades-STA file over precomputed features), report its
held-out R@1 and mIoU beside the trivial baseline, then find in every item's video the moment
its title describes: ``item_highlights`` (shares of the video). With
``encoder.video_highlight`` the embed stage encodes only that moment."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.stage import Stage, StageContext, StageReport


@dataclass
class GroundReport(StageReport):
    metrics_: dict
    trivial: dict
    n_train: int
    n_holdout: int
    items: int
    data: str
    rejected: int
    folder: str

    def text(self) -> str:
        from jobs.report import text_table

        keys = ["R@1@0.3", "R@1@0.5", "R@1@0.7", "R@5@0.5", "mIoU"]
        rows = [("GMU", *[self.metrics_[k] for k in keys]),
                ("trivial (mean span)", *[self.trivial[k] for k in keys])]
        head = (f"GMU trained on {self.n_train} {self.data} queries, held out {self.n_holdout}"
                + (f" ({self.rejected} annotation lines rejected)" if self.rejected else "")
                + f"; highlights for {self.items} items; model {self.folder}\n")
        return head + text_table([("", "s")] + [(k, ".1f") for k in keys], rows)

    def metrics(self) -> dict[str, float]:
        return {**{f"gmu.{k}": v for k, v in self.metrics_.items()},
                **{f"trivial.{k}": v for k, v in self.trivial.items()},
                "items": self.items}


def towers_of(cfg):
    """The item encoder's frozen image and text towers (the GMU's frame and query features)."""
    import dataclasses

    from mm_encoder.gmu import GroundingError
    from mm_encoder.item_encoder import Towers

    enc = cfg.encoder
    if enc.image_tower not in ("mobilenet_v2", "cat"):
        raise GroundingError(f"the ground stage reads per-frame features of the image tower; "
                             f"encoder.image_tower {enc.image_tower!r} is not supported here "
                             "(use mobilenet_v2 or cat)")
    return Towers(dataclasses.replace(enc, video=False))


def grounding_data(cfg, towers):
    """(GroundingSet, rejected annotation lines)."""
    from pipelines.grounding import read_charades_sta, synthetic_set

    g = cfg.ground
    if g.data == "charades":
        data, parsed = read_charades_sta(g.charades_annotations, g.charades_features,
                                         g.charades_durations, towers.text, g.max_frames,
                                         g.max_tokens)
        return data, len(parsed.rejected)
    return synthetic_set(g.synthetic_videos, g.synthetic_frames, g.synthetic_size,
                         cfg.world.seed * 1000 + g.seed, towers.image, towers.text,
                         g.max_tokens, g.max_frames), 0


def item_queries(items, towers, g):
    """The items with a video and a title as grounding queries (their titles over their
    videos); undecodable videos are left out (ingest validated them)."""
    import numpy as np

    from mm_encoder.camoe import decode_videos, frame_features, token_states
    from mm_encoder.gmu import GroundingSet

    ids, titles, videos = decode_videos(items.item_id, items.title, items.video,
                                        getattr(towers.image, "image_size", 64))
    if not ids:
        return np.zeros(0, np.int64), None
    fr, fm = frame_features(towers.image, videos, g.max_frames)
    tk, tm = token_states(towers.text, titles, g.max_tokens)
    return np.asarray(ids, np.int64), GroundingSet(fr, fm, tk, tm, np.zeros((len(ids), 2)),
                                                   np.arange(len(ids)), titles)


def run(ctx: StageContext) -> GroundReport:
    import hashlib

    import pyarrow as pa

    from feature_store import schemas
    from feature_store.facts import GroundingFacts
    from mm_encoder.gmu import predict, save_gmu, train_gmu

    cfg, g = ctx.cfg, ctx.cfg.ground
    towers = towers_of(cfg)
    data, rejected = grounding_data(cfg, towers)
    res = train_gmu(data, g, progress=ctx.progress)
    h = hashlib.sha256()
    for k, v in sorted(res.model.state_dict().items()):
        h.update(k.encode()), h.update(v.numpy().tobytes())
    version = "gmu-" + h.hexdigest()[:12]
    folder = save_gmu(res.model, ctx.artifacts / "gmu" / version, version=version,
                      metrics=res.metrics, trivial=res.trivial, data=g.data)
    ctx.tracker.artifact_dir(str(folder), "gmu")
    items = ctx.io.arrow("items", columns=["item_id", "title", "video"]).to_pandas()
    ids, queries = item_queries(items, towers, g)
    if queries is not None:
        spans, scores = predict(res.model, queries, top=1, scores_too=True)
        spans, scores = spans[:, 0], scores[:, 0]
    else:
        import numpy as np

        spans, scores = np.zeros((0, 2)), np.zeros(0)
    schema = schemas.item_highlights_schema()
    m, t = res.metrics, res.trivial
    out = ctx.io.write_arrow("item_highlights", pa.table({
        "item_id": pa.array(ids, pa.int64()),
        "highlight_start": pa.array(spans[:, 0], pa.float32()),
        "highlight_end": pa.array(spans[:, 1], pa.float32()),
        "score": pa.array(scores, pa.float32())}, schema=schema), schema=schema,
        facts=GroundingFacts(version, str(folder), g.data, res.trained_on, res.held_out,
                             m["R@1@0.5"], m["R@1@0.7"], m["mIoU"], t["R@1@0.5"], t["mIoU"],
                             len(ids)))
    return GroundReport({"item_highlights": out}, m, t, res.trained_on, res.held_out, len(ids),
                        g.data, rejected, str(folder))


STAGE = Stage(
    "ground", run, engine="torch", inputs=("items",), outputs=("item_highlights",),
    config=("ground", "encoder", "world"), applies=lambda cfg: cfg.ground.enabled,
    help="train the GMU video-grounding model (moment + clip levels, generation-guided), report "
         "held-out R@1/mIoU, and find in every item's video the moment its title describes")
