"""``ingest``: validate raw items, events and dated item tags, map ids, quarantine bad rows
(Spark)."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.report import text_table
from jobs.stage import Stage, StageContext, StageReport, files_fingerprint
from jobs.stages.world import is_synthetic

OUTPUTS = ("items", "events", "item_tags", "quarantine", "item_id_map", "user_id_map")


def inputs(cfg) -> tuple[str, ...]:
    return ("raw_items", "raw_events") if is_synthetic(cfg) else ()


def source_fingerprint(cfg) -> str:
    s = cfg.source
    if s.kind == "generic":
        return files_fingerprint([s.items, s.events, s.images_dir])
    if s.kind == "movielens":
        return files_fingerprint([s.movielens_dir, s.posters_dir])
    return ""


@dataclass
class IngestReport(StageReport):
    counts: dict[str, dict[str, int]]
    quarantine_reasons: dict[str, int]
    label_mode: str

    def text(self) -> str:
        lines = [text_table([("table", "s"), ("rows_in", "d"), ("rows_out", "d"),
                             ("quarantined", "d")],
                            [(t, c["in"], c["out"], c["quarantined"])
                             for t, c in self.counts.items()])]
        if self.quarantine_reasons:
            lines.append("quarantine reasons: " + ", ".join(
                f"{k}={v}" for k, v in sorted(self.quarantine_reasons.items())))
        lines.append(f"label mode: {self.label_mode}")
        return "\n".join(lines)

    def metrics(self) -> dict[str, float]:
        m = {f"{t}.{k}": v for t, c in self.counts.items() for k, v in c.items()}
        m.update({f"quarantine.{k}": v for k, v in self.quarantine_reasons.items()})
        return m


def run(ctx: StageContext) -> IngestReport:
    from pipelines.ingest import run_ingest
    from pipelines.sources import generic_source, movielens_source

    spark, io, source = ctx.spark, ctx.io, ctx.cfg.source
    if source.kind == "synthetic":
        raw_items, raw_events = io.spark(spark, "raw_items"), io.spark(spark, "raw_events")
        raw_tags = None
    elif source.kind == "generic":
        raw_items, raw_events, raw_tags = generic_source(spark, source)
    else:
        raw_items, raw_events, raw_tags = movielens_source(spark, source)
    # Ids stay stable across runs: the previous maps' ids are kept, new ids continue after them.
    frames = run_ingest(spark, raw_items, raw_events, source, ctx.cfg.ingest, raw_tags=raw_tags,
                        previous_item_map=io.previous_spark(spark, "item_id_map"),
                        previous_user_map=io.previous_spark(spark, "user_id_map"))
    try:
        out = {t: io.write_spark(t, df, schema, facts=facts)
               for t, (df, schema, facts) in frames.tables().items()}
        reasons = frames.quarantine_reasons()
        counts = frames.counts({t: m.row_count for t, m in out.items()}, reasons)
    finally:
        frames.release()      # also when a write or the row accounting fails
    return IngestReport(out, counts, reasons, frames.label_mode)


STAGE = Stage(
    "ingest", run, engine="spark", inputs=inputs, outputs=OUTPUTS, config=("source", "ingest"),
    external_fingerprint=source_fingerprint, continues=("item_id_map", "user_id_map"),
    help="validate raw items/events/tags, map ids, quarantine bad rows (Spark)")
