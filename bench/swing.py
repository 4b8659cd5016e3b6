"""Swing at scale: the Spark pairs job vs a single-process pandas/numpy implementation of the same
scores. Prints JSON.

    .venv/bin/python bench/swing.py --events 10000000 --local-sizes 1000000 2000000 5000000

Events come from the synthetic world's click model (latents only, no rendering). Spark computes
Swing scores and the top-N per item on the largest size (wall time; peak memory of the driver JVM
and of this process). The single process runs each size in a child process under a memory cap
(``--local-mem-gb``, default half the machine) until one no longer fits; the ratio is taken at
the largest size both ran, where the two must also agree on the scores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import emit, scratch_dir  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def make_events(n_events: int, n_items: int, seed: int = 0) -> pd.DataFrame:
    """Positive and negative impressions (user_id, item_id int64, ts, label) from the world."""
    from pipelines.config import WorldConfig
    from pipelines import synthetic as syn

    n_users = max(100, n_events // 200)
    w = WorldConfig(n_items=n_items, n_users=n_users, impressions_per_user=180, seed=seed)
    users, items, ts, _, label = syn.simulate_event_arrays(w, syn.draw_latents(w))
    return pd.DataFrame({"user_id": users.astype(np.int64), "item_id": items.astype(np.int64),
                         "ts": pd.to_datetime(ts, unit="ms", utc=True), "label": label})


def swing_pandas(user: np.ndarray, item: np.ndarray, alpha: float = 1.0,
                 max_common: int = 50) -> pd.DataFrame:
    """Swing scores (src, dst, score, support) of positive (user, item) pairs, no caps on
    histories (the benchmark's data does not reach them), vectorised with pandas."""
    ui = pd.DataFrame({"u": user, "i": item}).drop_duplicates()
    w = 1.0 / np.sqrt(ui.groupby("u").size())
    m = ui.merge(ui, on="i")
    m = m[m.u_x < m.u_y]
    n_common = m.groupby(["u_x", "u_y"]).i.transform("size")
    m = m[n_common >= 2].assign(n=n_common[n_common >= 2])
    m = m.sort_values(["u_x", "u_y", "i"], kind="stable")
    m = m[m.groupby(["u_x", "u_y"]).cumcount() < max_common]
    m["c"] = w.loc[m.u_x].values * w.loc[m.u_y].values / (alpha + m.n.values)
    p = m[["u_x", "u_y", "i", "c"]].merge(m[["u_x", "u_y", "i"]], on=["u_x", "u_y"])
    p = p[p.i_x != p.i_y]
    out = p.groupby(["i_x", "i_y"]).c.agg(["sum", "size"]).reset_index()
    out.columns = ["src", "dst", "score", "support"]
    return out


def run_local(path: str, out: str) -> None:
    ev = pd.read_parquet(path)
    pos = ev[ev.label == 1]
    t0 = time.perf_counter()
    res = swing_pandas(pos.user_id.to_numpy(), pos.item_id.to_numpy())
    seconds = time.perf_counter() - t0
    res.to_parquet(out + ".parquet")
    Path(out).write_text(json.dumps({
        "seconds": seconds, "pairs": len(res),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def local_case(events: pd.DataFrame, tmp: Path, mem_gb: float, timeout: int) -> dict:
    path = tmp / f"ev_{len(events)}.parquet"
    events.to_parquet(path, coerce_timestamps="ms", allow_truncated_timestamps=True)
    out = tmp / f"local_{len(events)}.json"
    limit = int(mem_gb * 2 ** 30)
    code = (f"import resource,sys; resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit})); "
            f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
            f"import swing; swing.run_local({str(path)!r}, {str(out)!r})")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"events": len(events), "fits": False, "why": f"over {timeout} s"}
    if proc.returncode != 0:
        why = "MemoryError" if "MemoryError" in proc.stderr else proc.stderr.strip()[-300:]
        return {"events": len(events), "fits": False, "why": why,
                "wall_seconds": round(time.perf_counter() - t0, 1)}
    r = json.loads(out.read_text())
    return {"events": len(events), "fits": True, "seconds": round(r["seconds"], 2),
            "pairs": r["pairs"], "peak_rss_mb": round(r["peak_rss_mb"])}


def spark_case(spark, events: pd.DataFrame, tmp: Path) -> tuple[dict, pd.DataFrame | None]:
    from pyspark.sql import functions as F

    from pipelines.pairs import PairsConfig, _top_n, positives, swing_scores, user_items

    path = tmp / f"spark_ev_{len(events)}.parquet"
    events.to_parquet(path, coerce_timestamps="ms", allow_truncated_timestamps=True)
    df = spark.read.parquet(str(path)).withColumn("label", F.col("label").cast("byte"))
    cfg = PairsConfig(min_support=1, max_user_items=10 ** 9, max_item_users=10 ** 9)
    t0 = time.perf_counter()
    far = pd.Timestamp("2100-01-01", tz="UTC").to_pydatetime()
    scores = swing_scores(user_items(positives(df, far), cfg), cfg)
    scores.write.mode("overwrite").parquet(str(tmp / "swing_scores"))
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    top = _top_n(spark.read.parquet(str(tmp / "swing_scores")), cfg, "swing")
    top.write.mode("overwrite").parquet(str(tmp / "swing_top"))
    top_s = time.perf_counter() - t1
    n_pairs = spark.read.parquet(str(tmp / "swing_scores")).count()
    return ({"events": len(events), "seconds": round(seconds, 2), "top_n_seconds": round(top_s, 2),
             "pairs": n_pairs}, None)


def jvm_peak_mb(spark) -> float | None:
    try:
        pid = spark.sparkContext._gateway.proc.pid
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except Exception:
        return None
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--local-sizes", type=int, nargs="+",
                    default=[1_000_000, 2_000_000, 5_000_000, 10_000_000, 20_000_000])
    ap.add_argument("--local-mem-gb", type=float, default=12.0)
    ap.add_argument("--local-timeout", type=int, default=1200)
    ap.add_argument("--out")
    args = ap.parse_args()
    tmp = scratch_dir("qarm-bench-swing-")

    from jobs.config import load_config
    from pipelines.spark import get_spark

    full = make_events(max(args.events, max(args.local_sizes)), args.items)
    cfg = load_config(None, [f"paths.root={tmp}", "spark.shuffle_partitions=16",
                             "spark.driver_memory=8g"])
    spark = get_spark(cfg.spark, cfg.root / "spark", cfg.root / "logs")

    local = []
    for n in sorted(args.local_sizes):
        sub = full.iloc[:n] if n < len(full) else full
        r = local_case(sub, tmp, args.local_mem_gb, args.local_timeout)
        local.append(r)
        print(json.dumps(r), file=sys.stderr)
        if not r["fits"]:
            break
    fitted = [r for r in local if r["fits"]]
    largest = fitted[-1]["events"] if fitted else None
    common = [r for r in fitted if r["events"] <= args.events]

    at_largest = None
    if common:
        size = common[-1]["events"]
        sub = full.iloc[:size]
        s, _ = spark_case(spark, sub, tmp)
        local_scores = pd.read_parquet(tmp / f"local_{size}.json.parquet")
        spark_scores = pd.read_parquet(tmp / "swing_scores")
        merged = local_scores.merge(spark_scores, on=["src", "dst"], suffixes=("_l", "_s"))
        agree = (len(merged) == len(local_scores) == len(spark_scores)
                 and np.allclose(merged.score_l, merged.score_s, rtol=1e-5))
        at_largest = {"events": size, "spark_seconds": s["seconds"],
                      "single_process_seconds": common[-1]["seconds"],
                      "ratio_spark_over_single_process": round(common[-1]["seconds"]
                                                               / s["seconds"], 3),
                      "scores_agree": bool(agree)}
    if at_largest is not None and at_largest["events"] == min(args.events, len(full)):
        spark_full = {"events": at_largest["events"], "seconds": at_largest["spark_seconds"],
                      "pairs": spark.read.parquet(str(tmp / "swing_scores")).count()}
    else:
        spark_full, _ = spark_case(spark, full.iloc[:args.events], tmp)
    result = {
        "benchmark": "swing", "cores": os.cpu_count(), "items": args.items,
        "positives_share": round(float(full.label.mean()), 4),
        "spark_full": {**spark_full, "driver_jvm_peak_rss_mb": jvm_peak_mb(spark),
                       "python_driver_peak_rss_mb":
                           round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)},
        "single_process": local, "single_process_memory_cap_gb": args.local_mem_gb,
        "largest_size_single_process_fits": largest,
        "first_size_single_process_does_not_fit": next(
            (r["events"] for r in local if not r["fits"]), None),
        "at_largest_common_size": at_largest,
    }
    emit(result, args.out)
    spark.stop()


if __name__ == "__main__":
    main()
