"""The online store: what the scoring service looks up per request, published from snapshots.

Per item: its external id, title, RQ codes, VQ bag, predicted tags and training popularity; per
user: the external id, the dense id and the last ``keep_positives`` positives (item ids and epoch
ms, oldest first); and the store's metadata (the codebook and encoder versions the codes belong
to, the most popular items for users nobody knows). Two backends behind one interface:

* ``sqlite`` (default): one file. A publish writes the new version's rows and moves the
  ``current`` pointer in one transaction; a reader runs each lookup in one read transaction (WAL
  mode: a snapshot of the database), so it sees the old version or the new one, never a mix.
* ``redis`` (``feature_store/online_redis.py``): each version under its own keys (``<prefix>:<version>:items`` ...); a publish
  writes them, then moves ``<prefix>:current`` with one ``SET``. A lookup is one Lua script
  (atomic in Redis) that reads the pointer and every record it needs. The script reads keys it
  derives from the pointer, which a Redis Cluster does not allow: use one Redis node (or a
  replica set) per store.

Both keep the previous version for readers that are still on it and delete older ones.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Optional, Sequence

log = logging.getLogger(__name__)


class OnlineStoreError(RuntimeError):
    """The online store is unreachable, empty, or holds something else than a qarm store."""


@dataclass
class OnlineConfig:
    #: ``sqlite`` (a file, default) or ``redis`` (a server).
    backend: Literal["sqlite", "redis"] = "sqlite"
    #: The SQLite file; default ``<paths.root>/online.db``.
    sqlite_path: Optional[str] = None
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: Key prefix in Redis (several stores can share a server).
    prefix: str = "qarm"
    #: A user's last N positives kept for serving (at least ``examples.history_len``, so that a
    #: request at a past time still finds the history the ranker saw in training).
    keep_positives: int = 200
    #: How many of the most popular items the store keeps for users it does not know.
    popular: int = 500


@dataclass
class ItemRecord:
    id: int
    external: str
    title: str
    rq: list[int]
    vq: list[int]
    tags: list[str] = field(default_factory=list)
    popularity: int = 0


@dataclass
class UserRecord:
    id: int
    external: str
    #: Positives, oldest first (time, then item id): item ids and epoch ms.
    items: list[int]
    ms: list[int]
    #: The RQ codes of ``items`` (from the same publish: one lookup serves a request).
    rq: list[list[int]] = field(default_factory=list)


@dataclass
class StoreMeta:
    version: str
    codebook_version: str
    encoder_version: str
    levels: int
    n_items: int
    n_users: int
    #: Item ids, most popular first.
    popular: list[int]
    published_at: float = 0.0
    #: The snapshots it was published from, by table.
    sources: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text) -> "StoreMeta":
        return cls(**json.loads(text))


@dataclass
class Lookup:
    """What one request reads, all from one published version."""

    meta: StoreMeta
    user: Optional[UserRecord]
    #: By external id (``None``: not in the store).
    items: dict[str, Optional[ItemRecord]]
    #: By dense id.
    by_id: dict[int, Optional[ItemRecord]]


def _item(text) -> Optional[ItemRecord]:
    return None if text is None else ItemRecord(**json.loads(text))


def _user(text) -> Optional[UserRecord]:
    return None if text is None else UserRecord(**json.loads(text))


def _dump(rec) -> str:
    return json.dumps(asdict(rec), separators=(",", ":"))


class OnlineStore(ABC):
    @abstractmethod
    def publish(self, meta: StoreMeta, items: Iterable[ItemRecord],
                users: Iterable[UserRecord]) -> str:
        """Make ``meta.version`` with these records the current version, atomically."""

    @abstractmethod
    def meta(self) -> Optional[StoreMeta]:
        """The current version's metadata (``None``: nothing published yet)."""

    @abstractmethod
    def lookup(self, user: Optional[str] = None, items: Sequence[str] = (),
               item_ids: Sequence[int] = ()) -> Lookup:
        """One request's records, from one version. Raises :class:`OnlineStoreError` when
        nothing is published."""

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- SQLite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (version TEXT PRIMARY KEY, meta TEXT NOT NULL,
                                     published_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS items (version TEXT NOT NULL, id INTEGER NOT NULL,
                                  external TEXT NOT NULL, record TEXT NOT NULL,
                                  PRIMARY KEY (version, id));
CREATE INDEX IF NOT EXISTS items_external ON items (version, external);
CREATE TABLE IF NOT EXISTS users (version TEXT NOT NULL, external TEXT NOT NULL,
                                  record TEXT NOT NULL, PRIMARY KEY (version, external));
"""


class SqliteStore(OnlineStore):
    """One SQLite file; one connection per thread (a service answers on several)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        con = self._con()
        con.executescript(_SCHEMA)

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            try:
                con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                      check_same_thread=False)
                con.execute("PRAGMA journal_mode=WAL")
                con.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.Error as e:
                raise OnlineStoreError(f"cannot open the online store {self.path}: {e}") from None
            self._local.con = con
        return con

    def publish(self, meta, items, users) -> str:
        con = self._con()
        v = meta.version
        meta.published_at = meta.published_at or time.time()
        con.execute("BEGIN IMMEDIATE")
        try:
            con.execute("DELETE FROM items WHERE version = ?", (v,))
            con.execute("DELETE FROM users WHERE version = ?", (v,))
            con.executemany("INSERT INTO items VALUES (?, ?, ?, ?)",
                            ((v, r.id, r.external, _dump(r)) for r in items))
            con.executemany("INSERT INTO users VALUES (?, ?, ?)",
                            ((v, r.external, _dump(r)) for r in users))
            con.execute("INSERT OR REPLACE INTO versions VALUES (?, ?, ?)",
                        (v, meta.to_json(), meta.published_at))
            prev = con.execute("SELECT value FROM meta WHERE key = 'current'").fetchone()
            con.execute("INSERT OR REPLACE INTO meta VALUES ('current', ?)", (v,))
            keep = {v} | ({prev[0]} if prev else set())
            old = [r[0] for r in con.execute("SELECT version FROM versions") if r[0] not in keep]
            for o in old:
                for table in ("items", "users", "versions"):
                    con.execute(f"DELETE FROM {table} WHERE version = ?", (o,))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return v

    def _meta(self, con) -> Optional[StoreMeta]:
        row = con.execute("SELECT v.meta FROM meta m JOIN versions v ON v.version = m.value "
                          "WHERE m.key = 'current'").fetchone()
        return None if row is None else StoreMeta.from_json(row[0])

    def meta(self) -> Optional[StoreMeta]:
        return self._meta(self._con())

    def lookup(self, user=None, items=(), item_ids=()) -> Lookup:
        con = self._con()
        con.execute("BEGIN")                  # one read transaction: one version throughout
        try:
            meta = self._meta(con)
            if meta is None:
                raise OnlineStoreError(f"the online store {self.path} is empty: run the "
                                       "publish stage (qarm publish)")
            v = meta.version
            u = None
            if user is not None:
                row = con.execute("SELECT record FROM users WHERE version = ? AND external = ?",
                                  (v, str(user))).fetchone()
                u = _user(row[0]) if row else None
            got = {}
            if items:
                q = ",".join("?" * len(items))
                got = {r[0]: _item(r[1]) for r in con.execute(
                    f"SELECT external, record FROM items WHERE version = ? AND external IN ({q})",
                    (v, *map(str, items)))}
            by = {}
            if item_ids:
                q = ",".join("?" * len(item_ids))
                by = {r[0]: _item(r[1]) for r in con.execute(
                    f"SELECT id, record FROM items WHERE version = ? AND id IN ({q})",
                    (v, *map(int, item_ids)))}
        finally:
            con.execute("COMMIT")
        return Lookup(meta, u, {str(x): got.get(str(x)) for x in items},
                      {int(i): by.get(int(i)) for i in item_ids})

    def records(self) -> tuple[StoreMeta, list[ItemRecord], list[UserRecord]]:
        """The current version's metadata and every record (to copy a store elsewhere)."""
        con = self._con()
        con.execute("BEGIN")
        try:
            meta = self._meta(con)
            if meta is None:
                raise OnlineStoreError(f"the online store {self.path} is empty")
            items = [_item(r[0]) for r in con.execute(
                "SELECT record FROM items WHERE version = ? ORDER BY id", (meta.version,))]
            users = [_user(r[0]) for r in con.execute(
                "SELECT record FROM users WHERE version = ? ORDER BY external", (meta.version,))]
        finally:
            con.execute("COMMIT")
        return meta, items, users

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None


def open_store(cfg: OnlineConfig, root: str | Path) -> OnlineStore:
    """The configured backend (SQLite at ``sqlite_path`` or ``<root>/online.db``)."""
    if cfg.backend == "redis":
        from feature_store.online_redis import RedisStore

        return RedisStore(cfg.redis_url, cfg.prefix)
    return SqliteStore(cfg.sqlite_path or Path(root) / "online.db")


def describe(cfg: OnlineConfig, root: str | Path) -> str:
    return (f"redis {cfg.redis_url} (prefix {cfg.prefix})" if cfg.backend == "redis" else
            f"sqlite {cfg.sqlite_path or Path(root) / 'online.db'}")


def records_from_tables(codes, id_map, titles, positives, popularity, user_map,
                        tags=None, keep: int = 200):
    """Item and user records from snapshot data (pandas frames):

    ``codes`` (item_id, rq, vq); ``id_map`` (external_id, id) of items; ``titles`` (item_id,
    title); ``positives`` (user_id, item_id, ms) of every positive event; ``popularity``: an
    array over dense item ids; ``user_map`` (external_id, id); ``tags`` (item_id, pred_tags).
    Items without codes are left out (the service codes them from content, or flags them)."""
    import numpy as np

    ext = dict(zip(id_map.id.astype(int), id_map.external_id.astype(str)))
    title = dict(zip(titles.item_id.astype(int), titles.title.fillna("").astype(str)))
    tag = ({} if tags is None else
           {int(i): [str(t) for t in (v if v is not None else [])]
            for i, v in zip(tags.item_id, tags.pred_tags)})
    items = [ItemRecord(int(i), ext.get(int(i), str(int(i))), title.get(int(i), ""),
                        [int(c) for c in rq], [int(c) for c in vq], tag.get(int(i), []),
                        int(popularity[i]) if i < len(popularity) else 0)
             for i, rq, vq in zip(codes.item_id, codes.rq, codes.vq)]
    pos = positives.sort_values(["user_id", "ms", "item_id"], kind="stable")
    uext = dict(zip(user_map.id.astype(int), user_map.external_id.astype(str)))
    rq_of = dict(zip(codes.item_id.astype(int), codes.rq))
    missing = [-1] * (len(items[0].rq) if items else 0)     # an uncoded history item
    users = []
    seen = set()
    for uid, g in pos.groupby("user_id", sort=True):
        g = g.tail(keep)
        hist = g.item_id.astype(int).tolist()
        users.append(UserRecord(int(uid), uext.get(int(uid), str(uid)), hist,
                                g.ms.astype(np.int64).tolist(),
                                [[int(c) for c in rq_of[i]] if i in rq_of else missing
                                 for i in hist]))
        seen.add(int(uid))
    users += [UserRecord(u, e, [], [], []) for u, e in uext.items() if u not in seen]
    return items, users
