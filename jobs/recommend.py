"""``qarm recommend --user ID``: one user's recommendations, with titles, from the registered
models: the ``champion`` retriever and ranker when those aliases exist, else the newest versions
(the retriever that wrote today's candidates, the ranker of the production arm).

The retriever ranks every item for the user's positives (the newest ``events`` snapshot; their
own positives excluded), the ranker re-ranks its top ``retrieval.rerank`` as examples built like
the examples stage's, at a time just after the user's last event. A user the id map does not know
gets the most popular items, said so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class RecommendError(ValueError):
    """Nothing to recommend from: no registered retriever, no store."""


@dataclass
class Recommendation:
    user: str
    source: str
    rows: list[dict]

    def text(self) -> str:
        from jobs.report import text_table

        return f"{self.source}\n" + text_table(
            [("rank", "d"), ("item", "s"), ("title", "s"), ("retriever", ".3f"),
             ("ranker", "s")],
            [(r["rank"], r["item"], r["title"][:60], r["retriever_score"],
              "-" if r["ranker_score"] is None else f"{r['ranker_score']:.3f}")
             for r in self.rows])


def _version(reg, name: str, **tags):
    from jobs.registry import CHAMPION

    return reg.alias(name, CHAMPION) or reg.find(name, **tags)


def recommend(cfg, user: str, k: int = 20) -> Recommendation:
    from feature_store.snapshots import SnapshotStore
    from jobs.registry import RANKER, RETRIEVER, Registry
    from recsys.retrieval_metrics import Queries, rank_queries
    from recsys.retrievers import Popularity, Tower
    from recsys.saved import load_ranker, load_retriever

    store = SnapshotStore(cfg.store_uri)
    users = store.read_arrow("user_id_map").to_pandas()
    item_map = store.read_arrow("item_id_map").to_pandas().set_index("id").external_id
    titles = store.read_arrow("items", columns=["item_id", "title"]).to_pandas().set_index(
        "item_id").title
    hit = users[users.external_id == str(user)]
    reg = Registry(cfg)
    serving = ""
    try:
        serving = store.get("candidates").facts.retriever_version
    except Exception:                       # no candidates yet: the newest retriever
        pass
    rv = reg.alias(RETRIEVER, "champion") or (reg.version(RETRIEVER, serving) if serving
                                                else reg.find(RETRIEVER))
    if rv is None:
        raise RecommendError("no qarm-retriever is registered: run the retrieve stage first "
                             "(qarm run --until retrieve)")
    model, feats = load_retriever(reg.download(rv))
    events = store.read_arrow("events", columns=["user_id", "item_id", "ts", "label"]
                              ).to_pandas()
    if hit.empty:
        scorer, hist, source = Popularity(feats.popularity), np.zeros(0, np.int64), (
            f"user {user} is unknown: the most popular items")
    else:
        uid = int(hit.id.iloc[0])
        mine = events[(events.user_id == uid) & (events.label == 1)].sort_values(
            ["ts", "item_id"])
        mine = mine[mine.item_id < feats.n_items]     # items newer than the retriever: none
        hist = mine.item_id.to_numpy(np.int64)
        scorer = Tower(model, feats)
        source = f"user {user}: qarm-retriever v{rv.version} ({rv.tags.get('item_repr')})"
    width = max(k, cfg.retrieval.rerank)
    q = Queries(np.asarray([0]), np.asarray([0, len(hist)]), hist, np.asarray([0, 0]),
                np.zeros(0, np.int64))
    top = rank_queries(lambda idx: scorer.scores([hist]), q, feats.n_items, width)[0]
    ret_scores = scorer.scores([hist])[0].numpy()
    ranker_scores = None
    rk = _version(reg, RANKER, arm=cfg.registry.arm)
    if rk is not None and not hit.empty:
        from recsys.scorer import score
        from pipelines.candidate_examples import candidate_examples

        ranker = load_ranker(reg.download(rk))
        if not ranker.spec.uses_frozen:
            ms = mine.ts.astype("datetime64[ms, UTC]").astype("int64").to_numpy()
            t = int(events.ts.max().value // 1_000_000) + 1
            qq = Queries(np.asarray([uid]), q.hist_offsets, hist, q.tgt_offsets, q.tgt_items)
            tags = (store.read_arrow("item_pred_tags", columns=["item_id", "pred_tags"])
                    .to_pandas() if ranker.spec.uses_pred_tags else None)
            rows, _ = candidate_examples(qq, top[None, :], {uid: (hist, ms, t)}, feats,
                                         feats.popularity == 0, cfg.examples, tags,
                                         ranker.spec.pred_tag_vocab)
            ranker_scores = dict(zip(rows.column("item_id").to_pylist(), score(ranker, rows)))
            top = np.asarray(sorted(top, key=lambda i: -ranker_scores[int(i)]))
            source += f", re-ranked by qarm-ranker v{rk.version} ({rk.tags.get('arm')})"
    rows = [{"rank": r + 1, "item": str(item_map.get(int(i), i)),
             "title": str(titles.get(int(i), "")), "retriever_score": float(ret_scores[i]),
             "ranker_score": None if ranker_scores is None else float(ranker_scores[int(i)])}
            for r, i in enumerate(top[:k])]
    return Recommendation(str(user), source, rows)
