"""``qarm serve``: the recommendation service (FastAPI on uvicorn) over the registered
``champion`` models and the online store.

* ``POST /score``: ``{"user_id": "u1", "items": ["i3", "i9"], "at": null, "content": []}`` →
  the ranker's click probability per item. ``at`` (epoch ms, optional) scores as of that time
  (the history is the positives strictly before it); ``content`` carries items the store does not
  know (``{"id", "title", "text", "tags", "image": base64, "video": [base64 frames]}``),
  coded on the fly with the champion's encoder and codebook. An unknown item without content
  is flagged, not scored.
* ``GET /recommend?user_id=u1&k=10``: the champion retriever's candidates re-ranked by the
  ranker; an unknown user (or one without history) gets the most popular items.
* ``GET /healthz``: the models and store versions (503 when the store no longer matches).
* ``GET /metrics``: Prometheus text: requests by endpoint and status, latency histograms,
  fallbacks by kind.

The service refuses to start when the online store's codebook is not the champion's
(:class:`recsys.serving.VersionSkew`), and answers 503 if a later publish breaks that.
Bad requests get a 4xx with a message: malformed JSON and wrong types 422, too many candidates
413, an impossible ``k`` 400.
"""

from __future__ import annotations

import logging
import time
from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

log = logging.getLogger(__name__)

Id = Union[StrictStr, StrictInt]


class Content(BaseModel):
    """An item the online store may not know, with what the encoder reads."""
    model_config = ConfigDict(extra="forbid")
    id: Id
    title: StrictStr = ""
    text: Optional[StrictStr] = None
    tags: list[StrictStr] = []
    image: Optional[StrictStr] = Field(None, description="base64 of an image file")
    video: list[StrictStr] = Field([], description="base64 of each frame's image file")


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: Id
    items: list[Id] = Field(min_length=1)
    at: Optional[StrictInt] = Field(None, description="epoch ms: score as of this time")
    content: list[Content] = []


class ServeError(RuntimeError):
    """The service cannot start: no champion, or a model it cannot serve."""


def load_service(cfg):
    """The :class:`recsys.serving.Service` of the registered champions over the configured
    online store."""
    import torch

    from feature_store.online import open_store
    from jobs.registry import CHAMPION, CODEBOOK, ENCODER, RANKER, RETRIEVER, Registry
    from recsys.saved import load_ranker, load_retriever
    from recsys.serving import Coder, Service, VersionSkew

    torch.set_num_threads(cfg.serve.threads)
    reg = Registry(cfg)
    rk = reg.alias(RANKER, CHAMPION)
    if rk is None:
        raise ServeError(f"{RANKER} has no champion: run the DAG through the promote stage "
                         "(qarm run), whose gate names one")
    ranker = load_ranker(reg.download(rk))
    spec = ranker.spec
    if spec.uses_frozen or (spec.uses_codes and spec.code_columns[0] != "rq"):
        raise ServeError(f"the champion {RANKER} v{rk.version} is arm {spec.arm}, which reads "
                         "frozen content vectors or raw codes; the service serves the arms on "
                         "aligned codes and ids (registry.arm: codes)")
    cb_version = rk.tags.get("codebook_version", "")
    info = {"ranker": f"{RANKER} v{rk.version} ({spec.arm})", "codebook_version": cb_version}
    retriever = feats = None
    rv = reg.alias(RETRIEVER, CHAMPION)
    if rv is not None:
        if rv.tags.get("codebook_version") not in (None, cb_version):
            raise VersionSkew(f"the champion {RETRIEVER} v{rv.version} reads codebook "
                              f"{rv.tags['codebook_version']}, the champion {RANKER} "
                              f"v{rk.version} codebook {cb_version}: promote models of one "
                              "codebook")
        retriever, feats = load_retriever(reg.download(rv))
        info["retriever"] = f"{RETRIEVER} v{rv.version} ({rv.tags.get('item_repr')})"
    else:
        info["retriever"] = "none (no champion): /recommend serves the most popular items"
    coder = None
    if cfg.serve.code_unknown_items and spec.uses_codes:
        from mm_encoder.item_encoder import ItemEncoder
        from quantizer.codebook import Codebook

        enc = ItemEncoder.load(str(reg.download(reg.version(ENCODER,
                                                            rk.tags["encoder_model_version"]))))
        cb_dir = reg.download(reg.version(CODEBOOK, rk.tags["codebook_model_version"]))
        coder = Coder(enc, Codebook.from_bytes((cb_dir / "codebook.npz").read_bytes()))
    store = open_store(cfg.online, cfg.root)
    try:
        return Service(store, ranker, codebook_version=cb_version, retriever=retriever,
                       retriever_feats=feats, coder=coder, cfg=cfg.serve, info=info,
                       rerank=cfg.retrieval.rerank)
    except BaseException:
        store.close()
        raise


def create_app(service):
    """The FastAPI app over a loaded service (one Prometheus registry per app)."""
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram,
                                   disable_created_metrics, generate_latest)

    from feature_store.online import OnlineStoreError
    from recsys.serving import BadRequest, ItemContent, TooManyCandidates, VersionSkew

    disable_created_metrics()
    metrics = CollectorRegistry()
    requests = Counter("qarm_requests", "HTTP requests", ["endpoint", "status"],
                       registry=metrics)
    latency = Histogram("qarm_request_latency_seconds", "request latency", ["endpoint"],
                        buckets=(.001, .0025, .005, .01, .02, .03, .05, .075, .1, .25, .5, 1,
                                 2.5), registry=metrics)
    fallbacks = Counter("qarm_fallbacks", "answers served by a fallback", ["kind"],
                        registry=metrics)

    app = FastAPI(title="qarm", description=__doc__)
    app.state.service = service

    endpoints = ("/score", "/recommend", "/healthz", "/metrics")

    class Timed:
        """Requests and latency per endpoint (plain ASGI: no per-request task or copy)."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            t0, status = time.perf_counter(), [500]

            async def sending(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                await self.inner(scope, receive, sending)
            finally:
                path = scope.get("path", "")
                endpoint = path if path in endpoints else "other"
                latency.labels(endpoint).observe(time.perf_counter() - t0)
                requests.labels(endpoint, str(status[0])).inc()

    app.add_middleware(Timed)

    def error(code: int, message: str, **extra):
        return JSONResponse({"error": message, **extra}, status_code=code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            if e.get("type") == "json_invalid":
                parts.append(f"malformed JSON near character {e['loc'][-1]}: "
                             f"{e.get('ctx', {}).get('error', e.get('msg'))}")
                continue
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
            parts.append(f"{where}: {e.get('msg')}")
        return error(422, "; ".join(parts) or "invalid request",
                     detail=[{k: v for k, v in e.items() if k in ("loc", "msg", "type")}
                             for e in exc.errors()])

    @app.exception_handler(BadRequest)
    async def bad(request: Request, exc: BadRequest):
        return error(413 if isinstance(exc, TooManyCandidates) else 400, str(exc))

    @app.exception_handler(VersionSkew)
    async def skew(request: Request, exc: VersionSkew):
        return error(503, str(exc))

    @app.exception_handler(OnlineStoreError)
    async def store_down(request: Request, exc: OnlineStoreError):
        return error(503, str(exc))

    # The handlers are CPU work of a few ms: they run on the event loop (a thread pool would
    # only add a hand-off; the GIL allows one at a time either way).
    @app.post("/score")
    async def score(req: ScoreRequest):
        content = [ItemContent(str(c.id), c.title, c.text, list(c.tags), c.image, list(c.video))
                   for c in req.content]
        out = service.score(str(req.user_id), [str(i) for i in req.items], req.at, content)
        if not out["known_user"]:
            fallbacks.labels("unknown_user").inc()
        for s in out["scores"]:
            if "flag" in s:
                fallbacks.labels(s["flag"]).inc()
        return JSONResponse(out)

    @app.get("/recommend")
    async def recommend(user_id: str = Query(..., min_length=1), k: int = Query(20)):
        out = service.recommend(user_id, k)
        if out.get("fallback"):
            fallbacks.labels(out["fallback"]).inc()
        return JSONResponse(out)

    @app.get("/healthz")
    async def healthz():
        try:
            meta = service.check_store()
        except (VersionSkew, OnlineStoreError) as e:
            return error(503, str(e), status="unhealthy")
        return {"status": "ok", **service.info, "store_version": meta.version,
                "store_codebook_version": meta.codebook_version,
                "published_at": meta.published_at}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics).decode(),
                                 media_type=CONTENT_TYPE_LATEST)

    return app


def serve(cfg, host: Optional[str] = None, port: Optional[int] = None) -> None:
    """Load the champions and answer on ``host:port`` until interrupted."""
    import uvicorn

    import gc

    service = load_service(cfg)
    app = create_app(service)
    # The models, towers and libraries are millions of long-lived objects: keep them out of
    # the collector's full passes, which otherwise stall a request for hundreds of ms.
    gc.collect()
    gc.freeze()
    host, port = host or cfg.serve.host, port or cfg.serve.port
    meta = service.store.meta()
    print(f"qarm serve: {service.info['ranker']}, retriever {service.info['retriever']}, "
          f"online store {meta.version} (codebook {meta.codebook_version}) on "
          f"http://{host}:{port}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                loop="auto", http="auto")
