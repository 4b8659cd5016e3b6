"""``world``: generate the synthetic multi-modal world (raw items and events, ground truth)."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from feature_store.facts import WorldFacts
from jobs.stage import Stage, StageContext, StageReport

OUTPUTS = ("raw_items", "raw_events", "truth_items", "truth_users", "truth_events")


def is_synthetic(cfg) -> bool:
    return cfg.source.kind == "synthetic"


@dataclass
class WorldReport(StageReport):
    facts: WorldFacts

    def text(self) -> str:
        f = self.facts
        return (f"world: {f.items} items ({f.cold_items} cold), {f.users} users, {f.events} "
                f"events, CTR {f.ctr:.3f}, train cut-off {f.train_cutoff}")

    def metrics(self) -> dict[str, float]:
        f = self.facts
        return {"items": f.items, "users": f.users, "events": f.events, "ctr": f.ctr,
                "cold_items": f.cold_items}


def run(ctx: StageContext) -> WorldReport:
    import pyarrow.compute as pc

    from pipelines import synthetic as syn

    w = ctx.cfg.world
    lat = syn.draw_latents(w)
    events, truth_events = syn.simulate_events(w, lat)
    items, truth_items = None, syn.truth_items_table(lat)
    if w.daily:       # the world as it stands at the end of the run's day
        items, end_ms = syn.as_of(w, lat, ctx.ds)
        end = pa.scalar(end_ms, pa.int64()).cast(syn.TS)
        events = events.filter(pc.less(events.column("ts"), end))
        truth_events = truth_events.filter(pc.less(truth_events.column("ts"), end))
        truth_items = truth_items.take(pa.array(items))
    facts = syn.world_summary(w, lat, events, items)
    io = ctx.io
    out = {}
    with io.writer("raw_items", schema=syn.RAW_ITEMS_SCHEMA, facts=facts) as wr:
        for chunk in syn.item_chunks(w, lat, progress=ctx.progress, items=items):
            wr.write_arrow(chunk)
        out["raw_items"] = wr.commit()
    for table, data, schema in (
            ("raw_events", events, syn.RAW_EVENTS_SCHEMA),
            ("truth_items", truth_items, syn.TRUTH_ITEMS_SCHEMA),
            ("truth_users", syn.truth_users_table(lat), syn.TRUTH_USERS_SCHEMA),
            ("truth_events", truth_events, syn.TRUTH_EVENTS_SCHEMA)):
        out[table] = io.write_arrow(table, data, schema=schema, facts=facts)
    return WorldReport(out, facts)


STAGE = Stage(
    "world", run, inputs=(), outputs=OUTPUTS, config=("world",), applies=is_synthetic,
    help="generate the synthetic multi-modal world (raw items, events, ground truth)")
