"""Online scoring: the ranker and the retriever answering one request from online-store records.

The ranker scores rows built exactly as the examples stage builds them
(``pipelines.examples.user_examples``): the history is the user's last ``history_len``
positives strictly before the request time, oldest first, with their RQ codes; each candidate
brings its RQ codes, VQ bag and predicted tags. Everything comes from one online-store version
(``feature_store.online``), whose codebook must be the models' (:class:`VersionSkew`).

An item the store does not know is coded on the fly when the request carries its content
(title, text, tags; an image as base64) and a coder is loaded (the champion's aligned encoder
and codebook); otherwise it is flagged and gets no score. A user the store does not know has no
history: the ranker scores with an empty one (as for a new user in training), and
``recommend`` serves the most popular items.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

from recsys.config import ServeConfig

import numpy as np

log = logging.getLogger(__name__)


class VersionSkew(RuntimeError):
    """The online store's codes belong to another codebook than the models'."""


class BadRequest(ValueError):
    """A request that is well-formed JSON but cannot be answered as asked (HTTP 4xx)."""


class TooManyCandidates(BadRequest):
    """More candidates than ``serve.max_candidates`` (HTTP 413)."""


@dataclass
class ItemContent:
    id: str
    title: str = ""
    text: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    #: Base64 of an encoded image (JPEG, PNG...), and of each video frame, in order.
    image: Optional[str] = None
    video: list[str] = field(default_factory=list)


class Coder:
    """Content → aligned embedding → RQ codes and VQ bag, with a registered encoder and
    codebook (the ones the ranker was trained with)."""

    def __init__(self, encoder, codebook):
        self.encoder, self.codebook = encoder, codebook

    def code(self, items: Sequence[ItemContent]) -> tuple[np.ndarray, np.ndarray]:
        def raw(c, what, text):
            try:
                return base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise BadRequest(f"item {c.id}: '{what}' is not base64") from None

        rows = [{"title": c.title, "text": c.text, "tags": c.tags,
                 "image": raw(c, "image", c.image) if c.image else None,
                 "video": [raw(c, "video", f) for f in c.video] or None} for c in items]
        try:                        # the encoder's MediaError is a ValueError
            media = [self.encoder.decode_media(r) for r in rows]
        except ValueError as e:
            raise BadRequest(f"an item's image cannot be decoded: {e}") from None
        emb = self.encoder.encode(rows, media)
        return self.codebook.encode(np.arange(len(rows)), emb)


def history_before(user, at_ms: Optional[int], history_len: int):
    """The user's last ``history_len`` positives strictly before ``at_ms`` (all when None):
    (item ids, their RQ codes)."""
    if user is None or not user.items:
        return [], []
    ms = np.asarray(user.ms, np.int64)
    k = len(ms) if at_ms is None else int(np.searchsorted(ms, at_ms, side="left"))
    lo = max(k - history_len, 0)
    return list(user.items[lo:k]), list(user.rq[lo:k])


def ranker_rows(levels: int, user_id: int, hist_items, hist_rq, item_ids, rq, vq, tags,
                t_ms: int, cold, new_user: bool):
    """Examples-schema rows (one per candidate) for the ranker."""
    import pyarrow as pa

    from feature_store.schemas import examples_schema

    n = len(item_ids)
    schema = examples_schema(levels)
    cols = {
        "user_id": [int(user_id)] * n, "item_id": [int(i) for i in item_ids],
        "ts": pa.array(np.full(n, t_ms, np.int64)).cast(pa.timestamp("ms", tz="UTC")),
        "label": [0] * n, "part": ["test"] * n, "cold": [bool(c) for c in cold],
        "new_user": [bool(new_user)] * n, "sampled": [False] * n,
        "hist_item_ids": [list(map(int, hist_items))] * n,
        "hist_rq": [[list(map(int, r)) for r in hist_rq]] * n,
        "rq": [list(map(int, r)) for r in rq], "vq": [list(map(int, v)) for v in vq],
        "hist_rq_raw": [None] * n, "rq_raw": [None] * n, "vq_raw": [None] * n,
        "frozen": [None] * n, "pred_tags": tags,
    }
    return pa.table({f.name: pa.array(cols[f.name], f.type) if not isinstance(
        cols[f.name], (pa.Array, pa.ChunkedArray)) else cols[f.name].cast(f.type)
        for f in schema}, schema=schema)


class Service:
    """The champion ranker (and retriever) over an online store: what the HTTP layer calls."""

    def __init__(self, store, ranker, *, codebook_version: str, retriever=None,
                 retriever_feats=None, coder: Optional[Coder] = None, cfg: ServeConfig,
                 info: Optional[dict] = None, rerank: int = 100):
        self.store, self.ranker, self.cfg = store, ranker, cfg
        self.codebook_version = codebook_version
        self.coder, self.info, self.rerank = coder, info or {}, rerank
        self.spec = ranker.spec
        self.vocab = {t: i for i, t in enumerate(self.spec.pred_tag_vocab)}
        self.tower = None
        if retriever is not None:
            from recsys.retrievers import Tower

            self.tower, self.feats = Tower(retriever, retriever_feats), retriever_feats
        self.check_store()

    def check_store(self):
        """The store's metadata; raises :class:`VersionSkew` when its codebook is not the
        models'."""
        meta = self.store.meta()
        if meta is None:
            from feature_store.online import OnlineStoreError

            raise OnlineStoreError("the online store is empty: run the publish stage "
                                   "(qarm publish) after training")
        self._check(meta)
        return meta

    def _check(self, meta):
        if meta.codebook_version != self.codebook_version:
            raise VersionSkew(
                f"the online store (version {meta.version}) holds codes of codebook "
                f"{meta.codebook_version}, but the champion models were trained with codebook "
                f"{self.codebook_version}: publish the store for the champion (qarm publish) "
                "or promote the models that match it")

    def _tags(self, tags: list[str]) -> list[int]:
        return [self.vocab[t] for t in tags if t in self.vocab]

    def _score_records(self, look, user, recs, at_ms, coded=None):
        """Probabilities for ``recs`` (ItemRecords) for ``user`` (a UserRecord or None)."""
        from recsys.scorer import score

        hist_items, hist_rq = history_before(user, at_ms, self.spec.history_len)
        if at_ms is None:
            at_ms = (user.ms[-1] + 1) if user is not None and user.ms else 0
        uid = user.id if user is not None else look.meta.n_users
        rows = ranker_rows(
            self.spec.levels, uid, hist_items, hist_rq, [r.id for r in recs],
            [r.rq for r in recs], [r.vq for r in recs],
            [self._tags(r.tags) if self.spec.uses_pred_tags else None for r in recs],
            at_ms, [r.popularity == 0 for r in recs], user is None)
        return score(self.ranker, rows) if recs else np.zeros(0, np.float32)

    def score(self, user: str, items: Sequence[str], at_ms: Optional[int] = None,
              content: Sequence[ItemContent] = ()) -> dict:
        if len(items) > self.cfg.max_candidates:
            raise TooManyCandidates(f"{len(items)} candidates; at most "
                                    f"{self.cfg.max_candidates} per request "
                                    "(serve.max_candidates)")
        look = self.store.lookup(user, items=items)
        self._check(look.meta)
        given = {c.id: c for c in content}
        recs, flags = [], {}
        unknown = [x for x in items if look.items[str(x)] is None]
        coded = {}
        if unknown:
            todo = [given[x] for x in unknown if x in given]
            if todo and self.coder is not None:
                from feature_store.online import ItemRecord

                rq, vq = self.coder.code(todo)
                for j, c in enumerate(todo):
                    coded[c.id] = ItemRecord(look.meta.n_items + j, c.id, c.title,
                                             rq[j].tolist(), vq[j].tolist())
            for x in unknown:
                flags[x] = "coded_from_content" if x in coded else (
                    "unknown_item" if x not in given else "unknown_item_not_coded")
        order = []
        for x in items:
            r = look.items[str(x)] or coded.get(x)
            if r is not None:
                recs.append(r)
                order.append(x)
        p = self._score_records(look, look.user, recs, at_ms)
        got = dict(zip(order, p.tolist()))
        return {"user_id": user, "known_user": look.user is not None,
                "store_version": look.meta.version, "codebook_version": look.meta.codebook_version,
                "scores": [{"item_id": x, "score": got.get(x), **(
                    {"flag": flags[x]} if x in flags else {})} for x in items]}

    def recommend(self, user: str, k: int) -> dict:
        import torch

        if not 1 <= k <= self.cfg.max_k:
            raise BadRequest(f"k must be between 1 and {self.cfg.max_k} (serve.max_k), got {k}")
        look = self.store.lookup(user)
        self._check(look.meta)
        u = look.user
        known = ([i for i in u.items if i < self.feats.n_items]
                 if u is not None and self.tower is not None else [])
        if u is None or not known or self.tower is None:
            # No history the retriever knows (none, or only items newer than it).
            why = ("unknown_user" if u is None else "no_retriever" if self.tower is None
                   else "no_history")
            top = look.meta.popular[:k]
            recs = self.store.lookup(item_ids=top).by_id
            return {"user_id": user, "known_user": u is not None, "source": "popularity",
                    "fallback": why, "store_version": look.meta.version,
                    "items": [self._row(recs.get(i), None) for i in top]}
        hist = np.asarray(known, np.int64)
        with torch.no_grad():
            s = self.tower.scores([hist[-self.tower.model.max_len:]])[0]
        s[torch.from_numpy(np.unique(np.asarray(u.items, np.int64)[
            np.asarray(u.items) < self.feats.n_items]))] = -torch.inf
        width = min(max(k, self.rerank), int(torch.isfinite(s).sum()))
        top = torch.topk(s, width).indices.numpy()
        look2 = self.store.lookup(user, item_ids=top.tolist())
        if look2.meta.version != look.meta.version:          # republished in between
            self._check(look2.meta)
            u = look2.user
        recs = [look2.by_id[int(i)] for i in top if look2.by_id[int(i)] is not None]
        p = self._score_records(look2, u, recs, None)
        order = np.argsort(-p, kind="stable")[:k]
        ret = {int(i): float(s[int(i)]) for i in top}
        return {"user_id": user, "known_user": True, "source": "retriever+ranker",
                "store_version": look2.meta.version,
                "items": [self._row(recs[j], float(p[j]), ret[recs[j].id]) for j in order]}

    @staticmethod
    def _row(rec, score, retriever_score=None) -> dict:
        if rec is None:
            return {"item_id": None}
        out = {"item_id": rec.external, "title": rec.title, "score": score}
        if retriever_score is not None:
            out["retriever_score"] = retriever_score
        return out
