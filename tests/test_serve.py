"""The online store (SQLite and a real redis-server) and the HTTP service (real uvicorn on a
loopback port) over the end-to-end run's champion models."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest

from feature_store.online import (ItemRecord, OnlineStoreError, SqliteStore, StoreMeta,
                                  UserRecord, records_from_tables)
from feature_store.online_redis import RedisStore
from recsys.serving import history_before
from tests.conftest import EXTRA, free_port, tiny_world_overrides


def _version(mark: int, n_items: int = 300, n_users: int = 50):
    """A publish whose every record carries ``mark`` (codes, VQ bag, history, meta)."""
    meta = StoreMeta(f"v{mark}", f"cb-{mark}", "enc", 2, n_items, n_users, [0, 1])
    items = [ItemRecord(i, f"i{i}", f"t{i}", [mark, mark], [mark] * 3) for i in range(n_items)]
    users = [UserRecord(u, f"u{u}", [1, 2], [10, 20], [[mark, mark]] * 2)
             for u in range(n_users)]
    return meta, items, users


def _stores(tmp_path, redis_url, request):
    if request.param == "sqlite":
        return SqliteStore(tmp_path / "online.db")
    return RedisStore(redis_url, prefix=f"t{time.time_ns()}")


@pytest.fixture(params=["sqlite", "redis"])
def store(tmp_path, redis_url, request):
    s = _stores(tmp_path, redis_url, request)
    yield s
    s.close()


def test_an_empty_store_says_so_and_lookups_find_what_was_published(store):
    assert store.meta() is None
    with pytest.raises(OnlineStoreError, match="empty"):
        store.lookup("u1", ["i1"])
    store.publish(*_version(7, n_items=5, n_users=2))
    look = store.lookup("u1", ["i3", "nope"], [4, 99])
    assert look.meta.codebook_version == "cb-7"
    assert look.user.items == [1, 2] and look.user.rq == [[7, 7], [7, 7]]
    assert look.items["i3"].rq == [7, 7] and look.items["nope"] is None
    assert look.by_id[4].external == "i4" and look.by_id[99] is None
    assert store.lookup("stranger").user is None


def test_a_publish_is_atomic_under_a_concurrent_reader(store):
    """A reader looping during 12 publishes only ever sees records of the version its
    metadata names (never a mix of two versions)."""
    store.publish(*_version(0))
    seen, mixed, stop = set(), [], threading.Event()
    asks = [f"i{i}" for i in range(0, 300, 7)]

    def reader():
        r = type(store)(store.path) if isinstance(store, SqliteStore) else \
            RedisStore(store.url, store.prefix)
        while not stop.is_set():
            look = r.lookup("u3", asks, [5, 250])
            mark = int(look.meta.codebook_version[3:])
            seen.add(mark)
            marks = {x.rq[0] for x in look.items.values()} | {
                x.vq[0] for x in look.by_id.values()} | {c[0] for c in look.user.rq}
            if marks != {mark}:
                mixed.append((mark, marks))
        r.close()

    t = threading.Thread(target=reader)
    t.start()
    try:
        for v in range(1, 13):
            store.publish(*_version(v))
    finally:
        time.sleep(0.05)
        stop.set()
        t.join()
    assert not mixed, mixed[:3]
    assert len(seen) >= 2                   # the reader did run across publishes
    assert store.meta().codebook_version == "cb-12"


def test_old_versions_are_deleted_keeping_the_previous_one(tmp_path):
    s = SqliteStore(tmp_path / "o.db")
    for v in range(4):
        s.publish(*_version(v, 3, 1))
    con = s._con()
    assert sorted(r[0] for r in con.execute("SELECT DISTINCT version FROM items")) == ["v2",
                                                                                        "v3"]


def test_records_keep_each_users_last_positives_with_their_codes():
    codes = pd.DataFrame({"item_id": [0, 1, 2], "rq": [[1, 2], [3, 4], [5, 6]],
                          "vq": [[0], [1, 2], []]})
    ids = pd.DataFrame({"external_id": ["a", "b", "c", "d"], "id": [0, 1, 2, 3]})
    titles = pd.DataFrame({"item_id": [0, 1, 2, 3], "title": ["A", "B", None, "D"]})
    pos = pd.DataFrame({"user_id": [0, 0, 0, 0], "item_id": [2, 0, 1, 3],
                        "ms": [30, 10, 20, 40]})
    users = pd.DataFrame({"external_id": ["x", "y"], "id": [0, 1]})
    items, urs = records_from_tables(codes, ids, titles, pos, np.array([1, 1, 1, 1]), users,
                                     keep=3)
    assert [i.external for i in items] == ["a", "b", "c"]        # d has no codes
    assert items[2].title == "" and items[1].vq == [1, 2]
    x = next(u for u in urs if u.external == "x")
    assert x.items == [1, 2, 3] and x.ms == [20, 30, 40]
    assert x.rq == [[3, 4], [5, 6], [-1, -1]]                    # an uncoded item: no code
    assert next(u for u in urs if u.external == "y").items == []


def test_history_is_the_positives_strictly_before_the_request_time():
    u = UserRecord(0, "x", [5, 6, 7, 8], [10, 20, 20, 30], [[5], [6], [7], [8]])
    assert history_before(u, 20, 10) == ([5], [[5]])
    assert history_before(u, 21, 2) == ([6, 7], [[6], [7]])
    assert history_before(u, None, 3) == ([6, 7, 8], [[6], [7], [8]])
    assert history_before(None, 5, 3) == ([], [])


# --------------------------------------------------------------------------- the service


def _cfg(root, *extra):
    from jobs.config import load_config

    return load_config(None, tiny_world_overrides(root) + EXTRA + list(extra))


class _Server:
    """The app on real uvicorn in a thread, on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)

    def call(self, path, body=None, raw: bytes | None = None):
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                text = r.read().decode()
                return r.status, (json.loads(text) if path != "/metrics" else text)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read().decode())

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def served(e2e_run, tmp_path_factory):
    """The service over a private copy of the run (its own MLflow store). When the tiny run's
    gate did not promote, the copy's challengers are made champions by hand, as an operator
    would with ``MlflowClient.set_registered_model_alias``."""
    import shutil

    from jobs.registry import CHALLENGER, CHAMPION, RANKER, RETRIEVER, Registry
    from jobs.serve import create_app, load_service

    root = tmp_path_factory.mktemp("served") / "q"
    shutil.copytree(e2e_run[0], root, ignore=shutil.ignore_patterns("spark", "runs"))
    reg = Registry(_cfg(root))
    for name in (RANKER, RETRIEVER):
        if reg.alias(name, CHAMPION) is None:
            reg.set_alias(name, CHAMPION, reg.alias(name, CHALLENGER).version)
    service = load_service(_cfg(root, "serve.max_candidates=50"))
    server = _Server(create_app(service))
    yield root, service, server
    server.stop()
    service.store.close()


def test_the_publish_stage_published_the_champions_codes(e2e_run):
    from feature_store.online import SqliteStore

    root, store = e2e_run[0], e2e_run[1]
    meta = SqliteStore(root / "online.db").meta()
    codes = store.get("item_codes")
    assert meta.codebook_version == codes.facts.codebook_version
    assert meta.n_items == store.read_arrow("item_id_map").num_rows
    pub = store.read_arrow("online_publications").to_pylist()[0]
    assert pub["version"] == meta.version and pub["items"] == codes.row_count


def test_score_equals_the_offline_scorer_on_the_same_examples(served):
    """Test examples (with their sampled negatives) of 8 users at their own times: the
    service's probabilities equal the registered ranker's on the examples rows."""
    import pyarrow.compute as pc

    from jobs.registry import CHAMPION, RANKER, Registry
    from recsys.saved import load_ranker
    from recsys.scorer import score

    root, _, server = served
    from feature_store.snapshots import SnapshotStore

    st = SnapshotStore(str(root / "store"))
    reg = Registry(_cfg(root))
    ranker = load_ranker(reg.download(reg.alias(RANKER, CHAMPION)))
    rows = st.read_arrow("eval_examples")
    rows = rows.filter(pc.equal(rows.column("part"), "test"))
    item_ext = dict(zip(*[st.read_arrow("item_id_map").column(c).to_pylist()
                          for c in ("id", "external_id")]))
    user_ext = dict(zip(*[st.read_arrow("user_id_map").column(c).to_pylist()
                          for c in ("id", "external_id")]))
    offline = score(ranker, rows)
    df = rows.select(["user_id", "item_id", "ts"]).to_pandas().assign(p=offline)
    df["ms"] = df.ts.astype("datetime64[ms, UTC]").astype("int64")
    checked = 0
    for (u, ms), g in list(df.groupby(["user_id", "ms"]))[:40:5]:
        g = g.drop_duplicates("item_id")
        status, out = server.call("/score", {"user_id": user_ext[u], "at": int(ms),
                                             "items": [item_ext[i] for i in g.item_id]})
        assert status == 200, out
        got = {s["item_id"]: s["score"] for s in out["scores"]}
        want = {item_ext[i]: p for i, p in zip(g.item_id, g.p)}
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-5,
                                   atol=1e-6)
        checked += len(g)
    assert checked >= 8


def test_each_kind_of_bad_request_gets_its_4xx_never_a_500(served):
    _, _, server = served
    cases = {
        "malformed JSON": ("/score", None, b'{"user_id": "u1", "items": '),
        "not an object": ("/score", [1, 2], None),
        "wrong type": ("/score", {"user_id": ["u1"], "items": ["i1"]}, None),
        "items not a list": ("/score", {"user_id": "u1", "items": "i1"}, None),
        "no items": ("/score", {"user_id": "u1", "items": []}, None),
        "unknown field": ("/score", {"user_id": "u1", "items": ["i1"], "x": 1}, None),
        "time not an int": ("/score", {"user_id": "u1", "items": ["i1"], "at": "noon"}, None),
        "too many candidates": ("/score", {"user_id": "u1",
                                           "items": [f"i{i}" for i in range(51)]}, None),
        "bad image": ("/score", {"user_id": "u1", "items": ["new"], "content": [
            {"id": "new", "title": "x", "image": "%%%"}]}, None),
        "k not a number": ("/recommend?user_id=u1&k=ten", None, None),
        "k too large": ("/recommend?user_id=u1&k=100000", None, None),
        "k zero": ("/recommend?user_id=u1&k=0", None, None),
        "no user": ("/recommend?k=3", None, None),
    }
    want = {"too many candidates": 413, "bad image": 400, "k too large": 400, "k zero": 400}
    for name, (path, body, raw) in cases.items():
        status, out = server.call(path, body, raw)
        assert status == want.get(name, 422), (name, status, out)
        assert out["error"], name
    status, metrics = server.call("/metrics")
    assert 'qarm_requests_total{endpoint="/score",status="413"} 1.0' in metrics
    assert 'status="500"' not in metrics


def test_unknown_users_and_items_are_served_by_fallbacks(served):
    _, service, server = served
    status, out = server.call("/recommend?user_id=nobody&k=5")
    assert status == 200 and out["source"] == "popularity" and not out["known_user"]
    assert len(out["items"]) == 5
    status, out = server.call("/recommend?user_id=u1&k=5")
    assert status == 200 and out["known_user"] and out["source"] == "retriever+ranker"
    ps = [r["score"] for r in out["items"]]
    assert ps == sorted(ps, reverse=True) and len(ps) == 5
    # A known item, an unknown one without content, and a new one coded from its content; the
    # content of a known item, coded on the fly, gets the codes the store publishes for most.
    status, out = server.call("/score", {"user_id": "nobody", "items": ["i1", "zzz", "new"],
                                         "content": [{"id": "new", "title": "A red bus"}]})
    assert status == 200 and not out["known_user"]
    s = {x["item_id"]: x for x in out["scores"]}
    assert 0 < s["i1"]["score"] < 1 and "flag" not in s["i1"]
    assert s["zzz"]["score"] is None and s["zzz"]["flag"] == "unknown_item"
    assert 0 < s["new"]["score"] < 1 and s["new"]["flag"] == "coded_from_content"
    _, metrics = server.call("/metrics")
    assert 'qarm_fallbacks_total{kind="unknown_user"}' in metrics
    assert 'qarm_fallbacks_total{kind="coded_from_content"} 1.0' in metrics
    status, h = server.call("/healthz")
    assert status == 200 and h["store_codebook_version"] == h["codebook_version"]


def test_on_the_fly_codes_of_known_items_match_the_published_ones(served, e2e_run):
    """An item's whole content sent with a request (title, text, tags, image and frames as
    base64) is coded with the champion's encoder and codebook into the codes the store holds."""
    import base64

    from recsys.serving import ItemContent

    _, service, server = served
    st = e2e_run[1]
    rows = [r for r in st.read_arrow("items").to_pylist() if r["item_id"] < 30]
    ext = dict(zip(*[st.read_arrow("item_id_map").column(c).to_pylist()
                     for c in ("id", "external_id")]))
    b64 = lambda b: base64.b64encode(b).decode()                       # noqa: E731
    content = [ItemContent(f"copy-{r['item_id']}", r["title"], r["text"], list(r["tags"] or []),
                           b64(r["image"]) if r["image"] else None,
                           [b64(f) for f in r["video"] or []]) for r in rows]
    rq, vq = service.coder.code(content)
    published = service.store.lookup(items=[ext[r["item_id"]] for r in rows]).items
    want = np.asarray([published[ext[r["item_id"]]].rq for r in rows])
    assert (rq == want).all(axis=1).mean() >= 0.9, (rq, want)
    # Through HTTP, with a frame list: coded and scored (its id row is another item's: only
    # its codes say what it is).
    status, out = server.call("/score", {"user_id": "u3", "items": ["copy"], "content": [{
        "id": "copy", "title": rows[0]["title"], "image": content[0].image,
        "video": content[0].video}]})
    assert status == 200 and out["scores"][0]["flag"] == "coded_from_content"
    assert 0 < out["scores"][0]["score"] < 1


def test_the_service_refuses_a_store_of_another_codebook(served, tmp_path, capsys):
    from jobs.cli import main
    from jobs.serve import load_service
    from recsys.serving import VersionSkew

    root = served[0]
    path = tmp_path / "skewed.db"
    SqliteStore(path).publish(*_version(1, 3, 1))
    with pytest.raises(VersionSkew, match="codebook cb-1"):
        load_service(_cfg(root, f"online.sqlite_path={path}"))
    args = []
    for o in tiny_world_overrides(root) + EXTRA + [f"online.sqlite_path={path}"]:
        args += ["--set", o]
    assert main(["serve", *args, "--port", str(free_port())]) == 2
    assert "VersionSkew" in capsys.readouterr().err
    # A publish of another codebook after start: the service answers 503, healthz says why.
    _, service, server = served
    original = service.store
    service.store = SqliteStore(path)
    try:
        status, out = server.call("/score", {"user_id": "u1", "items": ["i1"]})
        assert status == 503 and "cb-1" in out["error"]
        assert server.call("/healthz")[0] == 503
    finally:
        service.store = original


def test_the_redis_backend_serves_the_same_scores(served, e2e_run, redis_url):
    """Publishing the run to Redis (online.backend=redis) and serving from it gives the SQLite
    service's answers."""
    from jobs.cli import main
    from jobs.serve import load_service
    from tests.conftest import _args

    root = served[0]
    extra = ["--set", "online.backend=redis", "--set", f"online.redis_url={redis_url}",
             "--set", "online.prefix=e2e"]
    assert main(["publish", *_args(root, *extra), "--force"]) == 0
    svc = load_service(_cfg(root, "online.backend=redis", f"online.redis_url={redis_url}",
                            "online.prefix=e2e"))
    body = {"user_id": "u2", "items": ["i1", "i5", "i9"]}
    a = served[2].call("/score", body)[1]["scores"]
    b = svc.score("u2", ["i1", "i5", "i9"])["scores"]
    assert [x["score"] for x in a] == pytest.approx([x["score"] for x in b], rel=1e-6)
    svc.store.close()


def test_publish_recodes_every_item_for_a_champion_of_an_older_codebook(served, capsys):
    """A refit (another codebook today) that the gate has not promoted: publish codes every
    item with the champion's encoder and codebook, the same codes the champion trained on."""
    from jobs.cli import main
    from jobs.registry import CHAMPION, RANKER, Registry
    from tests.conftest import _args

    root = served[0]
    from feature_store.snapshots import SnapshotStore

    st = SnapshotStore(str(root / "store"))
    before = st.read_arrow("item_codes").to_pandas().set_index("item_id").sort_index()
    champ = Registry(_cfg(root)).alias(RANKER, CHAMPION)
    assert champ.tags["codebook_version"] == st.get("item_codes").facts.codebook_version
    db = root / "recoded.db"
    extra = ["--set", "quantize.rq.seed=7", "--set", f"online.sqlite_path={db}"]
    assert main(["run", "--only", "quantize", *_args(root, *extra)]) == 0
    assert st.get("item_codes").facts.codebook_version != champ.tags["codebook_version"]
    assert main(["run", "--only", "publish", *_args(root, *extra)]) == 0
    assert f"recoded for the champion qarm-ranker v{champ.version}" in capsys.readouterr().out
    store = SqliteStore(db)
    meta = store.meta()
    assert meta.codebook_version == champ.tags["codebook_version"]
    look = store.lookup(item_ids=before.index[:50].tolist())
    got = np.asarray([look.by_id[int(i)].rq for i in before.index[:50]])
    want = np.stack(before.rq.to_numpy()[:50])
    assert (got == want).all(axis=1).mean() >= 0.95
    store.close()
