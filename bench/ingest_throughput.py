"""Ingest throughput: the Spark job vs the single-process pyarrow/pandas implementation of the
same validation, on the same synthetic world, in one run. Prints JSON.

    .venv/bin/python bench/ingest_throughput.py --events 1000000 --items 5000

Both are built from the same rule tables (``pipelines/ingest_rules.py``), write the same five
snapshots (items, events, quarantine, id maps) to a temporary store and must agree on every count
and quarantine reason; the ratio is Spark throughput / single-process throughput.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import emit, scratch_dir  # noqa: E402

from feature_store.facts import EventsFacts, ItemsFacts  # noqa: E402
from feature_store.snapshots import SnapshotStore  # noqa: E402
from jobs.config import load_config  # noqa: E402
from pipelines import synthetic as syn  # noqa: E402


def corrupt_events(events, share: float, seed: int = 0):
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    n = events.num_rows
    item = np.array(events.column("item_id").to_pylist(), dtype=object)
    label = events.column("label").to_numpy().copy()
    item[rng.random(n) < share] = "no-such-item"
    label[rng.random(n) < share] = 2
    events = events.set_column(1, "item_id", pa.array(item.tolist(), pa.string()))
    events = events.set_column(3, "label", pa.array(label, pa.int8()))
    dups = events.take(np.flatnonzero(rng.random(n) < share))
    return pa.concat_tables([events, dups])


def corrupt_items(chunk, share: float, seed: int):
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng([seed, 7])
    images = chunk.column("image").to_pylist()
    for i in np.flatnonzero(rng.random(len(images)) < share):
        images[i] = images[i][: len(images[i]) // 2]
    return chunk.set_column(4, "image", pa.array(images, pa.binary()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000, help="target number of events")
    ap.add_argument("--items", type=int, default=5000)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--master", default="local[*]")
    ap.add_argument("--corrupt-share", type=float, default=0.01,
                    help="share of rows made bad (unknown item, label 2, duplicate, truncated "
                         "image) so the quarantine paths do real work")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    tmp = scratch_dir("qarm-bench-ingest-")
    mean_activity = 1.133  # E[LogNormal(0, 0.5)]
    per_user = int(round(args.events / args.users / mean_activity))
    cfg = load_config(None, [f"paths.root={tmp}", f"world.n_items={args.items}",
                             f"world.n_users={args.users}",
                             f"world.impressions_per_user={per_user}",
                             f"spark.master={args.master}", "spark.shuffle_partitions=8",
                             "ingest.image_partitions=8"])
    store = SnapshotStore(str(tmp / "store"))
    lat = syn.draw_latents(cfg.world)
    events, _ = syn.simulate_events(cfg.world, lat)
    world = syn.world_summary(cfg.world, lat, events)
    events = corrupt_events(events, args.corrupt_share)
    with store.writer("raw_items", schema=syn.RAW_ITEMS_SCHEMA, facts=world) as w:
        for k, chunk in enumerate(syn.item_chunks(cfg.world, lat, progress=False)):
            w.write_arrow(corrupt_items(chunk, args.corrupt_share, seed=k))
        w.commit()
    store.write_table("raw_events", events, schema=syn.RAW_EVENTS_SCHEMA, facts=world)

    # --- single process
    from pipelines.ingest_local import ingest_local

    t0 = time.perf_counter()
    res_local = ingest_local(store.read_arrow("raw_items"), store.read_arrow("raw_events"),
                             cfg.source, cfg.ingest)
    local_store = SnapshotStore(str(tmp / "local_store"))
    facts = {"items": ItemsFacts(res_local.counts["items"]["in"]),
             "events": EventsFacts(res_local.counts["events"]["in"], res_local.label_mode)}
    for name in ("items", "events", "quarantine", "item_id_map", "user_id_map"):
        local_store.write_table(name, getattr(res_local, name), facts=facts.get(name))
    local_s = time.perf_counter() - t0
    local_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # --- Spark (session start excluded: a scheduled job pays it once per DAG run)
    from pipelines.ingest import run_ingest
    from pipelines.spark import get_spark

    t0 = time.perf_counter()
    spark = get_spark(cfg.spark, cfg.root / "spark", cfg.root / "logs")
    spark.range(1).count()
    spark_start_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    spark_store = SnapshotStore(str(tmp / "spark_store"))
    frames = run_ingest(spark, store.read_spark(spark, "raw_items"),
                        store.read_spark(spark, "raw_events"), cfg.source, cfg.ingest)
    manifests = {name: spark_store.write_spark(name, df, schema, parents=[],
                                               config_hash="bench", facts=facts)
                 for name, (df, schema, facts) in frames.tables().items()}
    spark_reasons = frames.quarantine_reasons()
    spark_counts = frames.counts({t: manifests[t].row_count for t in ("items", "events")},
                                 spark_reasons)
    frames.release()
    spark_s = time.perf_counter() - t0

    agree = (res_local.counts == spark_counts
             and res_local.quarantine_reasons == spark_reasons)
    n = spark_counts["events"]["in"]
    out = {
        "benchmark": "ingest_throughput",
        "events": n, "items": args.items, "cores": os.cpu_count(), "spark_master": args.master,
        "spark_seconds": round(spark_s, 2), "spark_session_start_seconds": round(spark_start_s, 2),
        "single_process_seconds": round(local_s, 2),
        "spark_events_per_s": round(n / spark_s), "single_process_events_per_s": round(n / local_s),
        "ratio_spark_over_single_process": round(local_s / spark_s, 3),
        "single_process_peak_rss_mb": round(local_peak_mb),
        "label_mode": frames.label_mode, "counts_agree": agree, "counts": spark_counts,
        "quarantine_reasons": spark_reasons,
    }
    emit(out, args.out)
    spark.stop()
    if not agree:
        print(f"counts differ: local {res_local.counts} {res_local.quarantine_reasons} "
              f"spark {spark_counts} {spark_reasons}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
