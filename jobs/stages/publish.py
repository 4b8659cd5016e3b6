"""``publish``: the online store the scoring service reads (``feature_store.online``), from this
run's snapshots: every coded item (codes, VQ bag, title, predicted tags, popularity) and every
user's recent positives with their codes, tagged with the codebook and encoder versions.

The codes are the ones the ``champion`` ranker reads: when the champion was trained with another
codebook than today's (a refit the gate did not promote), every item is coded again from its
tower features with the champion's registered encoder and codebook, so that the service never
mixes codebooks. Without a registry (or a champion) it publishes today's codes. The publish is
atomic; the version id is a hash of what was published, so a rerun publishes the same version."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.stage import Stage, StageContext, StageReport


def inputs(cfg) -> tuple[str, ...]:
    # promotions: publish after the gate has chosen the champion.
    return ("item_codes", "item_features", "events", "items", "item_id_map", "user_id_map",
            "promotions") + (("item_pred_tags",) if cfg.pretrain.enabled else ())


@dataclass
class PublishReport(StageReport):
    version: str
    target: str
    codebook_version: str
    items: int
    users: int
    recoded_for: str

    def text(self) -> str:
        how = (f"recoded for the champion {self.recoded_for}" if self.recoded_for else
               "today's codes")
        return (f"published online store {self.version} to {self.target}: {self.items} items, "
                f"{self.users} users, codebook {self.codebook_version} ({how})")

    def metrics(self) -> dict[str, float]:
        return {"items": self.items, "users": self.users}


def publications_schema():
    import pyarrow as pa

    return pa.schema([("ds", pa.string()), ("version", pa.string()), ("target", pa.string()),
                      ("codebook_version", pa.string()), ("encoder_version", pa.string()),
                      ("items", pa.int64()), ("users", pa.int64()),
                      ("recoded_for", pa.string())])


def champion_codes(ctx: StageContext, facts):
    """(item_id, rq, vq) frame, codebook and encoder versions, and the ranker version it was
    recoded for ("" when today's codes are the champion's)."""
    import numpy as np
    import pandas as pd

    codes = ctx.io.arrow("item_codes", columns=["item_id", "rq", "vq"]).to_pandas()
    cfg = ctx.cfg
    if not (cfg.mlflow.enabled and cfg.train.register):
        return codes, facts.codebook_version, facts.encoder_version, ""
    from jobs.registry import CHAMPION, RANKER, Registry

    reg = Registry(cfg)
    champ = reg.alias(RANKER, CHAMPION)
    want = champ.tags.get("codebook_version") if champ is not None else None
    if champ is None or not want or want == facts.codebook_version:
        return codes, facts.codebook_version, facts.encoder_version, ""
    from feature_store.arrays import list_matrix
    from jobs.stages.promote import codes_of_version

    t = ctx.io.arrow("item_features").sort_by("item_id")
    ids = t.column("item_id").to_numpy()
    rq, vq = codes_of_version(reg, champ, ids, list_matrix(t.column("features"), np.float32),
                              list_matrix(t.column("present"), bool))
    frame = pd.DataFrame({"item_id": ids, "rq": list(rq), "vq": list(vq)})
    return frame, want, champ.tags.get("encoder_version", ""), f"qarm-ranker v{champ.version}"


def run(ctx: StageContext) -> PublishReport:
    import hashlib

    import numpy as np
    import pyarrow as pa

    from feature_store.facts import CodesFacts
    from feature_store.online import StoreMeta, describe, open_store, records_from_tables

    cfg, io = ctx.cfg, ctx.io
    facts = io.facts("item_codes", CodesFacts)
    codes, cb_version, enc_version, recoded = champion_codes(ctx, facts)
    ev = io.arrow("events", columns=["user_id", "item_id", "ts", "label"]).to_pandas()
    pos = ev[ev.label == 1]
    pos = pos.assign(ms=pos.ts.astype("datetime64[ms, UTC]").astype("int64"))[
        ["user_id", "item_id", "ms"]]
    id_map = io.arrow("item_id_map").to_pandas()
    n_items = int(max(id_map.id.max() + 1 if len(id_map) else 0,
                      codes.item_id.max() + 1 if len(codes) else 0))
    popularity = np.bincount(pos.item_id.to_numpy(np.int64), minlength=n_items)
    tags = io.arrow("item_pred_tags", columns=["item_id", "pred_tags"]).to_pandas() \
        if io.has("item_pred_tags") else None
    users_map = io.arrow("user_id_map").to_pandas()
    items, users = records_from_tables(
        codes, id_map, io.arrow("items", columns=["item_id", "title"]).to_pandas(), pos,
        popularity, users_map, tags, cfg.online.keep_positives)
    coded = np.zeros(n_items, bool)
    coded[codes.item_id.to_numpy(np.int64)] = True
    order = np.argsort(-popularity, kind="stable")
    popular = [int(i) for i in order[coded[order]][:cfg.online.popular]]
    key = "|".join([cb_version, str(cfg.online.keep_positives), str(cfg.online.popular)]
                   + sorted(io.manifest(t).ref for t in io.inputs))
    version = "pub-" + hashlib.sha256(key.encode()).hexdigest()[:12]
    meta = StoreMeta(version, cb_version, enc_version, len(items[0].rq) if items else 0,
                     n_items, int(users_map.id.max() + 1) if len(users_map) else 0, popular,
                     sources={t: io.manifest(t).ref for t in io.inputs})
    store = open_store(cfg.online, cfg.root)
    try:
        store.publish(meta, items, users)
    finally:
        store.close()
    target = describe(cfg.online, cfg.root)
    schema = publications_schema()
    out = io.write_arrow("online_publications", pa.table({
        "ds": [ctx.ds], "version": [version], "target": [target],
        "codebook_version": [cb_version], "encoder_version": [enc_version],
        "items": [len(items)], "users": [len(users)], "recoded_for": [recoded]},
        schema=schema), schema=schema)
    return PublishReport({"online_publications": out}, version, target, cb_version, len(items),
                         len(users), recoded)


STAGE = Stage(
    "publish", run, inputs=inputs, outputs=("online_publications",),
    config=("online",),
    help="publish item codes, VQ bags and users' recent positives to the online store (SQLite, "
         "or Redis by online.backend), tagged with the champion's codebook version")
