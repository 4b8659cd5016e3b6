"""``retrieve``: train the sequential retriever for every configured item representation (ids,
codes, ids+codes, frozen_aligned; sharded with DMP like the ranker) on the training part's
positives, judge them and the simple retrievers by full ranking on the test part (overall and on
cold targets, bootstrap intervals, paired differences), write the serving tower's top-K
``candidates`` for every user from a faiss index, register each tower in MLflow, and write
``retrieval.json`` beside the ranker's ``ablation.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass

from jobs.registry import CODEBOOK, ENCODER
from jobs.stage import Stage, StageContext, StageReport


def inputs(cfg) -> tuple[str, ...]:
    r = cfg.retrieval
    out = ["split_events", "items", "item_codes"]
    if "frozen_aligned" in r.towers or "content" in r.baselines:
        out.append("aligned_item_embeddings")
    if "item2item" in r.baselines:
        out.append("item_pairs")
    if cfg.daily.incremental:
        out.append("daily_plan")
    if two_stage_on(cfg):
        # The ranker trained on the same split's training part (registered by train).
        out += ["train_examples", "ranker_predictions"]
        if cfg.train.model.pred_tags and cfg.pretrain.enabled:
            out.append("item_pred_tags")     # the ranker reads the candidates' predicted tags
    return tuple(out)


def two_stage_on(cfg) -> bool:
    return (cfg.retrieval.rerank > 0 and cfg.mlflow.enabled and cfg.train.register
            and cfg.registry.arm in cfg.train.arms)


def trained_ranker(ctx: StageContext):
    """The production arm's ranker trained on this run's examples, or None."""
    from jobs.registry import RANKER, Registry
    from recsys.saved import load_ranker

    reg = Registry(ctx.cfg)
    v = reg.find(RANKER, arm=ctx.cfg.registry.arm,
                 examples=ctx.io.manifest("train_examples").ref)
    return None if v is None else (load_ranker(reg.download(v)), v.version)


@dataclass
class RetrieveReport(StageReport):
    summary: dict
    versions: dict

    def text(self) -> str:
        reg = ", ".join(f"{k}: qarm-retriever v{v}" for k, v in self.versions.items() if v)
        warm = self.summary.get("warm_started")
        return (format_summary(self.summary) + (f"\nregistered: {reg}" if reg else "")
                + (f"\nwarm-started from the previous day: {', '.join(warm)}" if warm else ""))

    def metrics(self) -> dict[str, float]:
        # `<retriever>.recall_at_<K>` (all test targets) is what the run report plots.
        out = {}
        for r in self.summary["rows"]:
            if r["n"] and r["slice"] in ("all", "cold"):
                metric = r["metric"].replace("@", "_at_")
                prefix = "" if r["slice"] == "all" else "cold_"
                out[f"{r['retriever']}.{prefix}{metric}"] = r["value"]
        for n, t in self.summary["towers"].items():
            out[f"{n}.valid_ndcg_at_10"] = float(sum(v or 0 for v in t["valid_ndcg@10"])
                                              / len(t["valid_ndcg@10"]))
        return out


def format_summary(s: dict) -> str:
    from jobs.report import text_table

    get = {(r["retriever"], r["slice"], r["metric"]): r for r in s["rows"]}
    names = list(dict.fromkeys(r["retriever"] for r in s["rows"]))

    def ci(name, sl, m):
        r = get.get((name, sl, m))
        if r is None or r["n"] == 0:
            return "-"
        return f"{r['value']:.4f} [{r['lo']:.4f}, {r['hi']:.4f}]"

    def val(name, sl, m):
        r = get.get((name, sl, m))
        return "-" if r is None or r["n"] == 0 else f"{r['value']:.4f}"

    table = text_table(
        [("retriever", "s"), ("R@10", "s"), ("R@20", "s"), ("R@50", "s"), ("N@10", "s"),
         ("N@20", "s"), ("cold R@50", "s"), ("cold N@10", "s")],
        [(n + (" *" if n == s["serve"] else "") + (" +" if n == s["best"] else ""), val(n, "all", "recall@10"),
          val(n, "all", "recall@20"), ci(n, "all", "recall@50"), val(n, "all", "ndcg@10"),
          val(n, "all", "ndcg@20"), ci(n, "cold", "recall@50"), val(n, "cold", "ndcg@10"))
         for n in names])
    diffs = [f"  {p['a']} - {p['b']} ({p['slice']}, {p['metric']}): {p['diff']:+.4f} "
             f"[{p['lo']:+.4f}, {p['hi']:+.4f}]" for p in s["pairs"]
             if p["metric"] in ("recall@50", "ndcg@10")]
    q = s["queries"]
    return (f"{table}\n{q['all']} test queries ({q['cold']} with cold targets); "
            f"{s['protocol']}; {int(s['level'] * 100)}% bootstrap over users"
            f"{' (' + str(len(s['config']['seeds'])) + ' seeds averaged per user)'}; "
            f"* = serving tower, + = best on validation NDCG@10"
            + (f"; two_stage = the ranker re-ranking {s['two_stage']['retriever']}'s top "
               f"{s['two_stage']['candidates']}" if "two_stage" in s else "")
            + "\npaired differences:\n" + "\n".join(diffs))


#: The registered parents of each tower (the models whose outputs it reads).
PARENTS = {"codes": (CODEBOOK, ENCODER), "ids+codes": (CODEBOOK, ENCODER),
           "frozen_aligned": (ENCODER,)}


def read_events(io):
    """(the split events' user_id, item_id, ts, label, part as pandas, the number of items)."""
    import pyarrow.compute as pc

    n_items = int(pc.max(io.arrow("items", columns=["item_id"]).column("item_id")).as_py()) + 1
    return io.arrow("split_events", columns=["user_id", "item_id", "ts", "label",
                                             "part"]).to_pandas(), n_items


def read_inputs(io, cfg):
    """(RetrievalData, ItemFeatures, aligned matrix or None, pairs or None, codes facts)."""
    import numpy as np

    from feature_store.arrays import ids_and_matrix
    from feature_store.facts import CodesFacts
    from recsys.retrieval import ItemFeatures
    from recsys.retrieval_data import retrieval_data

    r = cfg.retrieval
    events, n_items = read_events(io)
    data = retrieval_data(events, n_items, r.max_len)
    codes = io.arrow("item_codes", columns=["item_id", "rq", "vq"]).to_pandas()
    per_level = int(max((max(x) for x in codes.rq), default=0)) + 1
    feats = ItemFeatures.build(n_items, codes.item_id.to_numpy(), list(codes.rq),
                               list(codes.vq), per_level, data.popularity)
    aligned = pairs = None
    if io.has("aligned_item_embeddings"):
        ids, vecs = ids_and_matrix(io.arrow("aligned_item_embeddings"), "embedding")
        aligned = np.zeros((n_items, vecs.shape[1]), np.float32)
        aligned[ids] = vecs
    if io.has("item_pairs"):
        pairs = io.arrow("item_pairs", columns=["src", "dst", "score"]).to_pandas()
    return data, feats, aligned, pairs, io.facts("item_codes", CodesFacts)


def candidates_table(tower_model, feats, data, cfg, name: str):
    import numpy as np
    import pyarrow as pa

    from recsys.index import build_index, search_excluding
    from recsys.retrievers import Tower

    tower = Tower(tower_model, feats)
    index = build_index(tower.items.numpy(), cfg.index)
    users = tower.user_vectors(data.serving_histories).numpy()
    ids, scores = search_excluding(index, users, cfg.top_k, data.serving_histories)
    keep = ids >= 0
    ranks = np.broadcast_to(np.arange(1, ids.shape[1] + 1), ids.shape)
    n = int(keep.sum())
    return pa.table({
        "user_id": pa.array(np.repeat(data.serving_users, keep.sum(1)), pa.int64()),
        "item_id": pa.array(ids[keep], pa.int64()), "rank": pa.array(ranks[keep], pa.int32()),
        "score": pa.array(scores[keep], pa.float32()),
        "retriever": pa.array([name] * n, pa.string())})


def register(ctx: StageContext, res, feats, codes_facts, events_ref: str) -> dict:
    from jobs.registry import RETRIEVER, Registry
    from recsys.saved import save_retriever

    if not (ctx.cfg.retrieval.register and ctx.cfg.mlflow.enabled):
        return {}
    reg = Registry(ctx.cfg)
    out = {}
    for name, t in res.towers.items():
        folder = save_retriever(t.models[0], t.jobs[0], feats,
                                ctx.run_dir("retrieve", "registered", name.replace("+", "_")))
        tags = {"item_repr": name, "events": events_ref, "world_size": t.results[0]["world"],
                "seed": t.jobs[0].seed}
        parents = PARENTS.get(name, ())
        tags.update(reg.parent_tags(parents, codes_facts.codebook_version,
                                    codes_facts.encoder_version))
        out[name] = ctx.tracker.register_folder(str(folder),
                                                f"retriever_{name.replace('+', '_')}",
                                                RETRIEVER, tags=tags)
    return out


def run(ctx: StageContext) -> RetrieveReport:
    from feature_store import schemas
    from feature_store.facts import CandidatesFacts
    from recsys.retrieval_eval import run_retrieval, two_stage

    from jobs.daily import retriever_warm_starts

    io, r = ctx.io, ctx.cfg.retrieval
    data, feats, aligned, pairs, codes_facts = read_inputs(io, ctx.cfg)
    warm = retriever_warm_starts(ctx, codes_facts.codebook_version, ctx.run_dir("retrieve"))
    res = run_retrieval(data, feats, aligned, pairs, r, ctx.run_dir("retrieve"),
                        quiet=not ctx.progress, init_from=warm)
    found = trained_ranker(ctx) if two_stage_on(ctx.cfg) else None
    if found is not None:
        ranker, version = found
        from pipelines.candidate_examples import candidate_examples

        tags = (io.arrow("item_pred_tags", ["item_id", "pred_tags"]).to_pandas()
                if ranker.spec.uses_pred_tags else None)
        two_stage(res, data, ranker, lambda q, top: candidate_examples(
            q, top, data.test_times, feats, data.cold, ctx.cfg.examples, tags,
            ranker.spec.pred_tag_vocab), r.rerank, r)
        res.summary["two_stage"]["ranker"] = f"qarm-ranker v{version}"
    for name, t in res.towers.items():
        ctx.tracker.series(f"{name}.valid_ndcg_at_10", t.results[0]["valid_curve"])
    versions = register(ctx, res, feats, codes_facts, io.manifest("split_events").ref)
    serve = res.towers[res.serve]
    table = candidates_table(serve.models[0], feats, data, r, res.serve)
    out = io.write_arrow("candidates", table, schema=schemas.candidates_schema(),
                         facts=CandidatesFacts(res.serve, str(versions.get(res.serve) or ""),
                                               codes_facts.codebook_version, r.index, r.top_k,
                                               len(data.serving_users),
                                               {n: t.jobs[0].out_dir
                                                for n, t in res.towers.items()},
                                               tuple(warm)))
    text = json.dumps(res.summary, indent=1, default=float)
    ctx.tracker.artifact_text(text, "retrieval.json")
    folder = ctx.run_dir("evaluate")               # beside ablation.json
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "retrieval.json").write_text(text)
    if warm:
        res.summary["warm_started"] = sorted(warm)
    return RetrieveReport({"candidates": out}, res.summary, versions)


STAGE = Stage(
    "retrieve", run, engine="torch", inputs=inputs, outputs=("candidates",),
    config=lambda cfg: ("retrieval",) + (("daily",) if cfg.daily.incremental else ()),
    previous=("candidates",),
    help="train the sequential retriever (SASRec user tower over ids/codes/frozen item towers, "
         "sampled softmax with logQ, sharded with DMP), evaluate it and the simple retrievers "
         "by full ranking with intervals, write top-K candidates from a faiss index, register "
         "it")
