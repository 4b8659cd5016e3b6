"""``split``: assign every event to the training, validation or test part (global time cut or
per user); every later stage learns only from the training part."""

from __future__ import annotations

from dataclasses import dataclass

from feature_store.facts import SplitFacts
from jobs.report import text_table
from jobs.stage import Stage, StageContext, StageReport


@dataclass
class SplitReport(StageReport):
    facts: SplitFacts

    def text(self) -> str:
        f = self.facts
        head = (f"split {f.mode}: validation from {f.valid_start}, test from {f.test_start}"
                if f.mode != "per_user" else
                f"split per_user: each user's last positives are test and validation; "
                f"{f.users_too_short} users with too few positives are training only")
        table = text_table([("part", "s"), ("events", "d"), ("positives", "d"), ("users", "d")],
                           [(p, f.rows[p], f.positives[p], f.users[p]) for p in f.rows])
        if f.auto:
            head = f"split.mode auto chose {f.auto}\n{head}"
        return (f"{head}\n{table}\ntest users: {f.test_users_known} also in training (known), "
                f"{f.test_users_new} not (new)")

    def metrics(self) -> dict[str, float]:
        f = self.facts
        m = {f"{p}.{k}": getattr(f, k)[p] for p in f.rows for k in ("rows", "positives", "users")}
        m.update({"test_users_known": f.test_users_known, "test_users_new": f.test_users_new,
                  "users_too_short": f.users_too_short})
        return m


def run(ctx: StageContext) -> SplitReport:
    from pyspark import StorageLevel

    from feature_store import schemas
    from pipelines.accounting import check_rows
    from pipelines.split import auto_split, split_events, split_facts

    io, cfg = ctx.io, ctx.cfg.split
    events = io.spark(ctx.spark, "events")
    if cfg.mode == "auto":
        split, bounds, facts = auto_split(events, cfg, StorageLevel.MEMORY_AND_DISK)
    else:
        split, bounds = split_events(events, cfg)
        split = split.persist(StorageLevel.MEMORY_AND_DISK)
        facts = split_facts(split, cfg, bounds)
    out = io.write_spark("split_events", split, schemas.split_events_schema(), facts=facts)
    split.unpersist()
    check_rows("split: events in, events with a part out", io.manifest("events").row_count,
               out.row_count)
    return SplitReport({"split_events": out}, facts)


STAGE = Stage(
    "split", run, engine="spark", inputs=("events",), outputs=("split_events",), config=("split",),
    help="assign every event to the train, valid or test part (global time cut or per user, "
         "auto: the global cut unless most of its test events are from new users); "
         "later stages learn only from the train part")
