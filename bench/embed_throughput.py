"""Embed throughput: the Spark embed stage's inference vs the same encoder in one Python process,
same items, same batch size, same total torch threads, in one run. Prints JSON.

    .venv/bin/python bench/embed_throughput.py --items 1000

Spark runs ``cores`` tasks with one torch thread each; the single process runs one task with
``cores`` torch threads. Both include building the encoder (once per process). The target is a
Spark overhead of at most 15%: ``ratio_spark_over_single_process >= 0.85``.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import emit, scratch_dir  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402


def synthetic_items(n: int, seed: int = 0) -> pa.Table:
    from pipelines.config import WorldConfig
    from pipelines import synthetic as syn

    w = WorldConfig(n_items=n, seed=seed)
    lat = syn.draw_latents(w)
    raw = pa.concat_tables(syn.item_chunks(w, lat, progress=False))
    return pa.table({"item_id": pa.array(np.arange(n), pa.int64()), "title": raw["title"],
                     "text": raw["text"], "tags": raw["tags"], "image": raw["image"],
                     "video": raw["video"]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--out")
    args = ap.parse_args()
    cores = os.cpu_count() or 2
    items = synthetic_items(args.items)

    from mm_encoder.item_encoder import ItemEncoder, ItemEncoderConfig
    from pipelines.embed import embed_arrow_batches

    enc_cfg = ItemEncoderConfig(dim=64, image_size=args.image_size, batch_size=args.batch_size)

    # --- single process, all cores as torch threads
    import torch

    torch.set_num_threads(cores)
    t0 = time.perf_counter()
    enc = ItemEncoder(enc_cfg)
    local_rows = 0
    local = {}
    for b in embed_arrow_batches(iter(items.to_batches(max_chunksize=256)), enc, enc.version,
                                 args.batch_size):
        local_rows += b.num_rows
        for r in b.slice(0, 3).to_pylist():
            if r["item_id"] < 3:
                local[r["item_id"]] = r["embedding"]
    local_s = time.perf_counter() - t0
    local_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # --- Spark, one task per core, one torch thread per task
    from jobs.config import load_config
    from pipelines.embed import embed_items_spark
    from pipelines.spark import get_spark

    tmp = scratch_dir("qarm-bench-embed-")
    cfg = load_config(None, [f"paths.root={tmp}", f"spark.master=local[{cores}]"])
    spark = get_spark(cfg.spark, cfg.root / "spark", cfg.root / "logs")
    spark.range(1).count()
    # Feed Spark from Parquet, as the stage reads its snapshot.
    import pyarrow.parquet as pq

    pq.write_table(items, tmp / "items.parquet")
    df = spark.read.parquet(str(tmp / "items.parquet"))
    df.count()
    t0 = time.perf_counter()
    out, stats = embed_items_spark(spark, df, enc, batch_size=args.batch_size,
                                   threads_per_task=1, partitions=cores)
    out.write.mode("overwrite").parquet(str(tmp / "emb.parquet"))
    spark_s = time.perf_counter() - t0
    st = stats()
    got = {r["item_id"]: r["embedding"] for r in
           spark.read.parquet(str(tmp / "emb.parquet")).where("item_id < 3").collect()}
    same = all(np.allclose(got[k], local[k], atol=1e-4) for k in local)
    result = {
        "benchmark": "embed_throughput", "items": args.items, "cores": cores,
        "batch_size": args.batch_size, "image_size": args.image_size,
        "frames_per_item": len(items["video"][0]),
        "single_process_seconds": round(local_s, 2),
        "spark_seconds": round(spark_s, 2),
        "single_process_items_per_s": round(local_rows / local_s, 1),
        "spark_items_per_s": round(st.rows / spark_s, 1),
        "ratio_spark_over_single_process": round(local_s / spark_s, 3),
        "target_ratio": 0.85,
        "encoder_loads": st.loads,
        "spark_worker_peak_rss_mb": round(st.peak_rss_mb),
        "single_process_peak_rss_mb": round(local_peak),
        "embeddings_match": bool(same),
    }
    emit(result, args.out)
    spark.stop()


if __name__ == "__main__":
    main()
