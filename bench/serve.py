"""The recommendation service under load, printed as JSON.

Needs a run with a champion and a published online store (``make demo``). Starts ``qarm serve``
as its own process on a free loopback port, then an open-loop load generator (asyncio, keep-alive
connections, in this process) sends requests at a fixed rate for a bounded time: a request's
latency runs from the moment it was *due* to its last response byte, so a server that falls
behind is charged for the queue it builds (no coordinated omission).

1. ``POST /score`` with 100 candidates (random items, random known users) and
   ``GET /recommend?k=10`` (retrieval over every item + the ranker on ``retrieval.rerank``
   candidates), each at 50, 100 and 200 requests/s: p50, p99, errors, achieved rate, and the
   highest rate held (p99 <= 50 ms, no error, >= 95% of the rate achieved).
2. Online-store lookups of one request (a user + 100 items), SQLite vs Redis (a real
   ``redis-server`` started here, holding the same publish): p50, p99 and the ratio.

    .venv/bin/python bench/serve.py [--config configs/demo.yaml] [--seconds 10]
        [--rates 50,100,200] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import emit  # noqa: E402

import numpy as np  # noqa: E402

P99_TARGET_MS = 50.0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(ms) -> dict:
    a = np.asarray(ms, float)
    if not len(a):
        return {"p50_ms": None, "p99_ms": None}
    return {"p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2)}


#: uvicorn closes a keep-alive connection idle for 5 s; the pool drops them before that, as an
#: HTTP client library does, so a stale connection is never counted as a server error.
IDLE_S = 4.0


async def _request(pool: list, port: int, raw: bytes) -> int:
    """Send one request on a free keep-alive connection (a new one when none is free);
    returns the HTTP status."""
    conn = None
    while pool:
        reader, writer, used = pool.pop()
        if time.perf_counter() - used < IDLE_S:
            conn = reader, writer
            break
        writer.close()
    if conn is None:
        conn = await asyncio.open_connection("127.0.0.1", port)
    reader, writer = conn
    writer.write(raw)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    pool.append((reader, writer, time.perf_counter()))
    return status


async def load(port: int, make_request, rate: float, seconds: float) -> dict:
    from collections import Counter

    pool: list = []
    lat, errors, n = [], 0, int(rate * seconds)
    kinds: Counter = Counter()
    start = time.perf_counter() + 0.05

    async def one(i):
        nonlocal errors
        due = start + i / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        try:
            status = await asyncio.wait_for(_request(pool, port, make_request()), 10)
            if status != 200:
                errors += 1
                kinds[f"HTTP {status}"] += 1
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            errors += 1
            kinds[type(e).__name__] += 1
        lat.append((time.perf_counter() - due) * 1000)

    await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - start
    for _, w, _ in pool:
        w.close()
    return {"rate": rate, "requests": n, "errors": errors, "error_kinds": dict(kinds),
            "achieved_rps": round(n / wall, 1), **percentiles(lat)}


def held(row: dict) -> bool:
    return (row["errors"] == 0 and row["p99_ms"] is not None and row["p99_ms"] <= P99_TARGET_MS
            and row["achieved_rps"] >= 0.95 * row["rate"])


def http(method: str, path: str, body: bytes = b"") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def store_lookups(cfg, users, items, calls: int, seed: int) -> dict:
    """p50/p99 of one request's lookup (a user + 100 items), SQLite then Redis (same publish)."""
    from feature_store.online import SqliteStore
    from feature_store.online_redis import LocalRedis, RedisStore

    sqlite = SqliteStore(cfg.online.sqlite_path or cfg.root / "online.db")
    meta, recs_items, recs_users = sqlite.records()
    folder = tempfile.mkdtemp(prefix="qarm-bench-redis-")
    with LocalRedis(folder) as url:
        red = RedisStore(url, "bench")
        red.publish(meta, recs_items, recs_users)
        out = {}
        for name, store in (("sqlite", sqlite), ("redis", red)):
            rng = random.Random(seed)
            lat = []
            for _ in range(calls):
                u, its = rng.choice(users), rng.sample(items, 100)
                t = time.perf_counter()
                look = store.lookup(u, its)
                lat.append((time.perf_counter() - t) * 1000)
                assert look.user is not None and all(v is not None for v in look.items.values())
            out[name] = percentiles(lat)
        red.close()
    shutil.rmtree(folder, ignore_errors=True)
    out["redis_over_sqlite_p50"] = round(out["redis"]["p50_ms"] / out["sqlite"]["p50_ms"], 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rates", default="50,100,200")
    ap.add_argument("--lookups", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    a = ap.parse_args()
    from feature_store.snapshots import SnapshotStore
    from jobs.config import load_config

    cfg = load_config(a.config, a.set)
    from feature_store.online import open_store

    if cfg.online.backend != "sqlite" or open_store(cfg.online, cfg.root).meta() is None:
        emit({"bench": "serve", "skipped": "no published SQLite online store under "
              f"{cfg.root}: run `make demo` first"}, a.out)
        return 0
    st = SnapshotStore(cfg.store_uri)
    users = st.read_arrow("user_id_map").column("external_id").to_pylist()
    items = st.read_arrow("item_id_map").column("external_id").to_pylist()
    rng = random.Random(a.seed)

    port = free_port()
    cmd = [str(Path(sys.executable).parent / "qarm"), "serve", "--config", a.config,
           "--port", str(port)] + sum((["--set", s] for s in a.set), [])
    t0 = time.perf_counter()
    log = tempfile.NamedTemporaryFile("w+", prefix="qarm-serve-", suffix=".log", delete=False)
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    import urllib.request

    health = None
    while time.perf_counter() - t0 < 180 and server.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                health = json.loads(r.read())
                break
        except OSError:
            time.sleep(0.5)
    if health is None:
        server.kill()
        out = Path(log.name).read_text()
        print(f"qarm serve did not come up:\n{out}", file=sys.stderr)
        return 1
    startup = time.perf_counter() - t0

    def score_req():
        body = json.dumps({"user_id": rng.choice(users), "items": rng.sample(items, 100)})
        return http("POST", "/score", body.encode())

    def rec_req():
        return http("GET", f"/recommend?user_id={rng.choice(users)}&k=10")

    rows = {"score_100": [], "recommend_10": []}
    try:
        for name, make in (("score_100", score_req), ("recommend_10", rec_req)):
            asyncio.run(load(port, make, 20, 2))                  # warm-up
            for rate in [float(x) for x in a.rates.split(",")]:
                row = asyncio.run(load(port, make, rate, a.seconds))
                row["held"] = held(row)
                rows[name].append(row)
                print(json.dumps({name: row}), file=sys.stderr)
    finally:
        server.terminate()
        server.wait(timeout=20)
    lookups = store_lookups(cfg, users, items, a.lookups, a.seed)
    emit({
        "bench": "serve", "cpu_count": os.cpu_count(), "seconds_per_rate": a.seconds,
        "server_start_s": round(startup, 1), "health": health, "p99_target_ms": P99_TARGET_MS,
        "endpoints": rows,
        "highest_rate_held": {k: max((r["rate"] for r in v if r["held"]), default=None)
                              for k, v in rows.items()},
        "online_store_lookup_user_plus_100_items": lookups,
    }, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
