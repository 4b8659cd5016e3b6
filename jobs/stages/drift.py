"""``drift`` (daily runs only, ``daily.incremental``): decide whether today refits the encoder's
alignment and the codebook, or codes the new items with the previous day's.

It codes the items the previous day did not have with the previous day's aligned encoder and
codebook and measures how far they sit from the items that codebook already codes
(``quantizer.metrics.drift``: the reconstruction error ratio and the level-1 code shift, each
against what as many random old items reach by chance). A refit happens on the first day, on
``daily.refit`` (``qarm run --refit``), or when a measure passes both its threshold and its
chance level with at least ``daily.min_new_items`` new items. The ``daily_plan`` snapshot tells
``align``, ``quantize``, ``train`` and ``retrieve`` what to do: a refit bumps the encoder and
codebook versions and retrains the models from scratch (old code ids mean nothing under a new
codebook); otherwise the versions stay and the models warm-start.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobs.stage import Stage, StageContext, StageReport

PREVIOUS = ("aligned_item_embeddings", "item_codes")


@dataclass
class DriftReport(StageReport):
    plan: object        # DailyPlanFacts

    def text(self) -> str:
        p = self.plan
        what = ("refit the alignment and the codebook; train from scratch" if p.refit else
                f"keep encoder {p.encoder_version} and codebook {p.codebook_version}; "
                "warm-start")
        return f"daily plan: {what} ({p.reason}); {p.new_items} new items"

    def metrics(self) -> dict[str, float]:
        p = self.plan
        return {"refit": int(p.refit), "new_items": p.new_items, "error_ratio": p.error_ratio,
                "error_ratio_null": p.error_ratio_null, "tv": p.tv, "tv_null": p.tv_null}


def decide(cfg, measures: dict | None, previous: bool) -> tuple[bool, str]:
    """(refit, reason) from the drift ``measures`` (None when there is no previous day)."""
    d = cfg.daily
    if not previous:
        return True, "first day: nothing to continue"
    if d.refit:
        return True, "refit asked for (daily.refit / --refit)"
    m = measures
    said = (f"error ratio {m['error_ratio']:.3f} (threshold {d.drift_threshold}, chance "
            f"{m['error_ratio_null']:.3f}), level-1 shift {m['tv']:.3f} (threshold "
            f"{d.utilization_threshold}, chance {m['tv_null']:.3f}) over {m['new_items']} new "
            "items")
    if m["new_items"] < d.min_new_items:
        return False, f"no drift: fewer than daily.min_new_items={d.min_new_items} new items; {said}"
    err = m["error_ratio"] > max(d.drift_threshold, m["error_ratio_null"])
    tv = m["tv"] > max(d.utilization_threshold, m["tv_null"])
    return (True, f"drift: {said}") if err or tv else (False, f"no drift: {said}")


def run(ctx: StageContext) -> DriftReport:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from feature_store.arrays import ids_and_matrix, list_matrix
    from feature_store.facts import CodesFacts, DailyPlanFacts, EmbeddingFacts
    from mm_encoder.item_encoder import ItemEncoder
    from quantizer.codebook import Codebook
    from quantizer.metrics import drift

    io, cfg = ctx.io, ctx.cfg
    prev_emb, prev_codes = io.previous_day("aligned_item_embeddings"), io.previous_day("item_codes")
    feats_t = io.arrow("item_features")
    if prev_emb is None or prev_codes is None:
        refit, reason = decide(cfg, None, False)
        plan = DailyPlanFacts(True, reason, feats_t.num_rows)
    else:
        ef, cf = prev_emb.facts_of(EmbeddingFacts), prev_codes.facts_of(CodesFacts)
        coded = io.previous_day_arrow("item_codes", ["item_id"]).column("item_id")
        new_t = feats_t.filter(pc.invert(pc.is_in(feats_t.column("item_id"), coded)))
        new = ItemEncoder.embed_features_from(
            ef.encoder_artifact, list_matrix(new_t.column("features"), np.float32),
            list_matrix(new_t.column("present"), bool))
        _, old = ids_and_matrix(io.previous_day_arrow("aligned_item_embeddings"), "embedding")
        rng = np.random.default_rng(cfg.quantize.rq.seed)
        if len(old) > cfg.quantize.fit_sample:
            old = old[rng.choice(len(old), cfg.quantize.fit_sample, replace=False)]
        cb = Codebook.load(str(ctx.artifacts / "codebooks"), cf.codebook_version)
        m = drift(cb.rq, old, new)
        refit, reason = decide(cfg, m, True)
        plan = DailyPlanFacts(refit, reason, int(new_t.num_rows), ef.encoder_artifact,
                              ef.encoder_version, cf.codebook_version,
                              ef.pairs_snapshot or "", _ds_of(ctx, prev_codes.ref), m["error_ratio"],
                              m["error_ratio_null"], m["tv"], m["tv_null"])
    row = pa.table({"ds": [ctx.ds], "refit": [plan.refit], "reason": [plan.reason],
                    "new_items": [plan.new_items], "error_ratio": [plan.error_ratio],
                    "tv": [plan.tv]})
    out = io.write_arrow("daily_plan", row, facts=plan)
    return DriftReport({"daily_plan": out}, plan)


def _ds_of(ctx: StageContext, ref: str) -> str:
    """The day whose run wrote ``ref`` (from the run state), for the report."""
    from jobs.state import RunState

    for r in reversed(RunState(ctx.cfg.root / "state.db").rows()):
        if ref in r["outputs"].values():
            return r["ds"]
    return ""


def is_daily(cfg) -> bool:
    return cfg.daily.incremental


STAGE = Stage(
    "drift", run, inputs=("item_features",), outputs=("daily_plan",),
    config=("daily", "quantize"), applies=is_daily, previous=PREVIOUS,
    help="(daily runs) decide whether today refits the alignment and the codebook: the new "
         "items' drift from the codes the previous day's codebook gives")
