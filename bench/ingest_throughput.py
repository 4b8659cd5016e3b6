"""Ingest throughput: the Spark job vs the single-process pyarrow/pandas implementation of the
same validation, on the same synthetic world, in one run. Prints JSON.

    .venv/bin/python bench/ingest_throughput.py --events 1000000 --items 5000

Both are built from the same rule tables (``pipelines/ingest_rules.py``), write the same five
snapshots (items, events, quarantine, id maps) to a temporary store and must agree on every count
and quarantine reason; the ratio is Spark throughput / single-process throughput.

The two run ``--repeats`` times, interleaved, in one process and one Spark session (its start is
not counted). ``ratio_spark_over_single_process`` compares the first runs: Spark's first ingest
in a session pays the JVM's and the Python workers' warm-up, as a scheduled job does on every
run. ``ratio_best_of_repeats`` compares each side's best.

``floor`` is what Spark needs for the least work any ingest under the stage's contract does,
in one pass over each raw table: the events hashed by their duplicate key (the shuffle a
duplicate check needs) and the items' media decoded in Python workers, each straight into the
same snapshot writer (sorted files with content hashes, whose row counts are the counts); no
rule, id map or quarantine. It runs in a child process with its own Spark session, first cold
and then warm. ``ratio_bound_*`` (one-process time over the floor's) is the best ratio an
ingest built from Spark jobs, Python-worker decoding and this writer could reach on this
machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
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


def _config(root: Path, args: argparse.Namespace):
    mean_activity = 1.133  # E[LogNormal(0, 0.5)]
    per_user = int(round(args.events / args.users / mean_activity))
    return load_config(None, [f"paths.root={root}", f"world.n_items={args.items}",
                              f"world.n_users={args.users}",
                              f"world.impressions_per_user={per_user}",
                              f"spark.master={args.master}", "spark.shuffle_partitions=8",
                              "ingest.image_partitions=8"])


def spark_floor(spark, store: SnapshotStore, out: SnapshotStore, ingest) -> dict:
    """The least work any ingest of ``store``'s raw tables does, timed (see the module doc):
    one pass over each table, straight into the snapshot writer."""
    from pipelines.media import validate_media

    max_bytes, min_side = ingest.max_image_bytes, ingest.min_image_side

    def decoded(batches):
        # Every item's media is decoded and checked; the rows go on unchanged.
        for batch in batches:
            cols = batch.to_pydict()
            for i in range(batch.num_rows):
                validate_media(cols["image"][i], None, cols["video"][i], None, max_bytes,
                               min_side)
            yield batch

    raw = {"events": store.get("raw_events"), "items": store.get("raw_items")}
    t0 = time.perf_counter()
    events = store.read_spark(spark, "raw_events")
    # The shuffle any duplicate-key check needs: the events hashed by (user, item, time).
    n_events = out.write_spark("floor_events", events.repartition("user_id", "item_id", "ts"),
                               raw["events"].schema, config_hash="floor").row_count
    items = store.read_spark(spark, "raw_items").repartition(ingest.image_partitions)
    n_items = out.write_spark("floor_items", items.mapInArrow(decoded, items.schema),
                              raw["items"].schema, config_hash="floor").row_count
    seconds = time.perf_counter() - t0
    read = {t: m.row_count for t, m in raw.items()}
    if {"events": n_events, "items": n_items} != read:
        raise SystemExit(f"the floor wrote {n_events} events and {n_items} items of {read}")
    return {"seconds": round(seconds, 2), "events": n_events, "items": n_items}


def floor_main(args: argparse.Namespace) -> None:
    """``--floor-of DIR``: the floor on the raw tables under DIR, in this fresh process."""
    from pipelines.spark import get_spark

    root = Path(args.floor_of)
    cfg = _config(root, args)
    spark = get_spark(cfg.spark, root / "floor-spark", root / "logs")
    spark.range(1).count()
    runs = [spark_floor(spark, SnapshotStore(str(root / "store")),
                        SnapshotStore(str(root / f"floor_store{k}")), cfg.ingest)
            for k in range(2)]
    spark.stop()
    Path(args.floor_out).write_text(json.dumps({"cold": runs[0], "warm": runs[1]}))


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
    ap.add_argument("--repeats", type=int, default=3,
                    help="interleaved runs of each side; the first Spark run is the cold one")
    ap.add_argument("--no-floor", action="store_true", help="skip the floor's child process")
    ap.add_argument("--floor-timeout", type=int, default=1800,
                    help="seconds the floor's child process may take")
    ap.add_argument("--floor-of", help=argparse.SUPPRESS)
    ap.add_argument("--floor-out", help=argparse.SUPPRESS)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    if args.floor_of:
        return floor_main(args)

    tmp = scratch_dir("qarm-bench-ingest-")
    cfg = _config(tmp, args)
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

    floor = None
    if not args.no_floor:
        # First, so the floor's JVM never runs beside the main session's. A failed or hung
        # floor is reported in the JSON; it does not cost the main comparison.
        floor_json = tmp / "floor.json"
        try:
            child = subprocess.run([sys.executable, __file__, "--floor-of", str(tmp),
                                    "--floor-out", str(floor_json), "--events", str(args.events),
                                    "--items", str(args.items), "--users", str(args.users),
                                    "--master", args.master],
                                   capture_output=True, text=True, timeout=args.floor_timeout)
            if child.returncode == 0 and floor_json.exists():
                floor = json.loads(floor_json.read_text())
            else:
                floor = {"error": f"exit {child.returncode}: {child.stderr[-2000:]}"}
        except subprocess.TimeoutExpired:
            floor = {"error": f"timed out after {args.floor_timeout} s"}
        if "error" in floor:
            print(f"[ingest] the floor failed: {floor['error']}", file=sys.stderr)

    from pipelines.ingest import run_ingest
    from pipelines.ingest_local import ingest_local
    from pipelines.spark import get_spark

    def run_local(k: int):
        t0 = time.perf_counter()
        res = ingest_local(store.read_arrow("raw_items"), store.read_arrow("raw_events"),
                           cfg.source, cfg.ingest)
        local_store = SnapshotStore(str(tmp / f"local_store{k}"))
        facts = {"items": ItemsFacts(res.counts["items"]["in"]),
                 "events": EventsFacts(res.counts["events"]["in"], res.label_mode)}
        for name in ("items", "events", "quarantine", "item_id_map", "user_id_map"):
            local_store.write_table(name, getattr(res, name), facts=facts.get(name))
        return time.perf_counter() - t0, res

    def run_spark(k: int):
        t0 = time.perf_counter()
        spark_store = SnapshotStore(str(tmp / f"spark_store{k}"))
        frames = run_ingest(spark, store.read_spark(spark, "raw_items"),
                            store.read_spark(spark, "raw_events"), cfg.source, cfg.ingest)
        manifests = {name: spark_store.write_spark(name, df, schema, parents=[],
                                                   config_hash="bench", facts=facts)
                     for name, (df, schema, facts) in frames.tables().items()}
        reasons = frames.quarantine_reasons()
        counts = frames.counts({t: manifests[t].row_count for t in ("items", "events")},
                               reasons)
        frames.release()
        return time.perf_counter() - t0, counts, reasons, frames.label_mode

    # The session's start is not counted: a scheduled job pays it once per DAG run.
    t0 = time.perf_counter()
    spark = get_spark(cfg.spark, cfg.root / "spark", cfg.root / "logs")
    spark.range(1).count()
    spark_start_s = time.perf_counter() - t0
    local_s, spark_s, agree = [], [], True
    for k in range(args.repeats):
        seconds, res_local = run_local(k)
        local_s.append(seconds)
        if k == 0:
            local_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        seconds, spark_counts, spark_reasons, label_mode = run_spark(k)
        spark_s.append(seconds)
        same = (res_local.counts == spark_counts
                and res_local.quarantine_reasons == spark_reasons)
        if not same:
            print(f"run {k}: counts differ: local {res_local.counts} "
                  f"{res_local.quarantine_reasons} spark {spark_counts} {spark_reasons}",
                  file=sys.stderr)
        agree &= same
        print(f"[ingest] run {k}: one process {local_s[-1]:.2f} s, Spark {spark_s[-1]:.2f} s",
              file=sys.stderr, flush=True)

    n = spark_counts["events"]["in"]
    out = {
        "benchmark": "ingest_throughput",
        "events": n, "items": args.items, "cores": os.cpu_count(), "spark_master": args.master,
        "repeats": args.repeats,
        "spark_seconds": round(spark_s[0], 2), "spark_seconds_runs": [round(x, 2) for x in spark_s],
        "spark_session_start_seconds": round(spark_start_s, 2),
        "single_process_seconds": round(local_s[0], 2),
        "single_process_seconds_runs": [round(x, 2) for x in local_s],
        "spark_events_per_s": round(n / spark_s[0]),
        "single_process_events_per_s": round(n / local_s[0]),
        "ratio_spark_over_single_process": round(local_s[0] / spark_s[0], 3),
        "ratio_best_of_repeats": round(min(local_s) / min(spark_s), 3),
        "single_process_peak_rss_mb": round(local_peak_mb),
        "label_mode": label_mode, "counts_agree": agree, "counts": spark_counts,
        "quarantine_reasons": spark_reasons,
    }
    if floor is not None and "error" not in floor:
        floor["ratio_bound_cold"] = round(local_s[0] / floor["cold"]["seconds"], 3)
        floor["ratio_bound_best"] = round(min(local_s) / floor["warm"]["seconds"], 3)
        floor["agrees"] = (floor["cold"]["events"] == n
                           and floor["cold"]["items"] == spark_counts["items"]["in"])
        agree &= floor["agrees"]
        out["counts_agree"] = agree
    if floor is not None:
        out["floor"] = floor
    emit(out, args.out)
    spark.stop()
    if not agree:
        sys.exit(1)


if __name__ == "__main__":
    main()
