"""Train the configured retriever towers and judge them, with the simple retrievers, by full
ranking on the test queries (``recsys.retrieval_metrics``), overall and on cold targets, with
bootstrap intervals over users and paired differences; every tower's per-user metrics are
averaged over its seeds first (seeds are a second source of variance, as in the ablation)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recsys.retrieval_metrics import (KS_NDCG, KS_RECALL, Queries, bootstrap_mean,
                                      evaluate_queries, paired_difference)

PROTOCOL = ("full ranking over all items, the user's earlier positives excluded; history = "
            "every positive before the target; Recall@K (= HR@K with one target) and NDCG@K")
#: Differences reported with paired intervals, when both sides were evaluated.
PAIRS = (("codes", "random"), ("codes", "popularity"), ("ids+codes", "ids"), ("codes", "ids"),
         ("codes", "frozen_aligned"), ("codes", "content"), ("codes", "code_prefix"),
         ("ids+codes", "content"))
METRICS = tuple(f"recall@{k}" for k in KS_RECALL) + tuple(f"ndcg@{k}" for k in KS_NDCG)


@dataclass
class TrainedTower:
    name: str
    models: list            # one per seed
    jobs: list
    results: list


@dataclass
class RetrievalResult:
    towers: dict[str, TrainedTower]
    serve: str
    #: The retriever (tower or baseline) with the best validation NDCG@10, and every
    #: retriever's scorer (towers: their seed-0 model).
    best: str
    retrievers: dict
    #: retriever -> slice -> metric -> per-query values (aligned with the slice's queries).
    per_query: dict[str, dict[str, dict[str, np.ndarray]]]
    queries: dict[str, Queries]
    summary: dict = field(default_factory=dict)


def global_batch(cfg, n_sequences: int) -> int:
    """``retrieval.batch_size``, capped at the training sequences (rounded down to a multiple of
    the ranks) so that small data still makes a batch."""
    if cfg.batch_size % cfg.ranks:
        raise ValueError(f"retrieval.batch_size {cfg.batch_size} must divide evenly over "
                         f"retrieval.ranks {cfg.ranks}")
    batch = min(cfg.batch_size, (n_sequences // cfg.ranks) * cfg.ranks)
    if batch == 0:
        raise ValueError(f"{n_sequences} training sequences cannot feed {cfg.ranks} ranks: "
                         "lower retrieval.ranks")
    return batch


def tower_job(cfg, name: str, seed: int, out: Path, features: str, frozen: str,
              sequences: str, valid: str, n_sequences: int, init_from: str = ""):
    from recsys.retrieval_train import RetrievalJob

    batch = global_batch(cfg, n_sequences)
    return RetrievalJob(name, str(out), features, frozen if name == "frozen_aligned" else "",
                        sequences, valid, cfg.dim, cfg.max_len, cfg.blocks, cfg.heads,
                        cfg.dropout, cfg.temperature, cfg.sampled_negatives,
                        batch // cfg.ranks, cfg.epochs, cfg.patience, cfg.valid_every,
                        cfg.max_steps, cfg.sparse_lr,
                        cfg.dense_lr, cfg.init_scale, seed, cfg.device, cfg.threads_per_rank,
                        cfg.timeout_s, cfg.ranks, init_from)


def baselines(cfg, data, feats, aligned, pairs, seed: int) -> dict:
    from recsys import retrievers as R

    out = {}
    for name in cfg.baselines:
        if name == "random":
            out[name] = R.Random(data.n_items, seed)
        elif name == "popularity":
            out[name] = R.Popularity(data.popularity)
        elif name == "item2item" and pairs is not None and len(pairs):
            out[name] = R.ItemToItem(pairs.src.to_numpy(), pairs.dst.to_numpy(),
                                     pairs.score.to_numpy(), data.n_items, data.popularity,
                                     cfg.recent)
        elif name == "content" and aligned is not None:
            out[name] = R.Content(aligned, cfg.recent)
        elif name == "code_prefix":
            out[name] = R.CodePrefix(feats.rq, feats.codes_per_level, data.popularity,
                                     cfg.recent)
    return out


def _evaluate(retriever, queries: dict[str, Queries], n_items: int) -> dict:
    out = {}
    for sl, q in queries.items():
        hist = q.histories()
        out[sl] = evaluate_queries(lambda idx: retriever.scores([hist[i] for i in idx]), q,
                                   n_items)
    return out


def run_retrieval(data, feats, aligned, pairs, cfg, work: Path, quiet: bool = False,
                  init_from: dict[str, str] | None = None) -> RetrievalResult:
    """Train every tower of ``cfg.towers`` on every seed, evaluate them and the baselines;
    a tower named in ``init_from`` warm-starts from that state dict (the daily job)."""
    from recsys.retrievers import Tower
    from recsys.launch import concurrent_runs, run_concurrently
    from recsys.retrieval_train import save_features, train_retriever

    work.mkdir(parents=True, exist_ok=True)
    if not data.sequences:
        raise ValueError("no user has two training positives: the retriever has nothing to "
                         "learn from")
    features = save_features(feats, work / "features.npz")
    frozen = ""
    if aligned is not None:
        frozen = str(work / "aligned.npy")
        np.save(frozen, aligned.astype(np.float32))
    sequences = data.save_sequences(work / "sequences.npz")
    valid = ""
    if len(data.valid):
        valid = str(work / "valid.npz")
        data.valid.save(Path(valid))
    queries = {"valid": data.valid, "all": data.test,
               "cold": data.test.only_targets(data.cold)}
    towers, per_query, scorers = {}, {}, {}
    if "frozen_aligned" in cfg.towers and aligned is None:
        raise ValueError("the frozen_aligned tower needs aligned_item_embeddings")
    jobs = {(name, seed): tower_job(cfg, name, seed,
                                    work / name.replace("+", "_") / f"seed{seed}", features,
                                    frozen, sequences, valid, len(data.sequences),
                                    (init_from or {}).get(name, ""))
            for name in cfg.towers for seed in cfg.seeds}
    # Every tower and seed is an independent run: ``workers`` of them train at once.
    workers = concurrent_runs(cfg.parallel_towers, cfg.ranks, cfg.threads_per_rank,
                              cfg.device, cfg.launcher)
    trained = dict(zip(jobs, run_concurrently(
        lambda job: train_retriever(job, cfg.ranks, cfg.launcher, quiet or workers > 1),
        list(jobs.values()), workers)))
    for name in cfg.towers:
        t = towers[name] = TrainedTower(name, [], [], [])
        runs = []
        for seed in cfg.seeds:
            model, result = trained[(name, seed)]
            t.models.append(model), t.jobs.append(jobs[(name, seed)]), t.results.append(result)
            scorer = Tower(model, feats)
            scorers.setdefault(name, scorer)
            runs.append(_evaluate(scorer, queries, data.n_items))
        per_query[name] = {sl: {m: np.mean([r[sl][m] for r in runs], axis=0) for m in METRICS}
                           for sl in queries}
    for name, r in baselines(cfg, data, feats, aligned, pairs, cfg.seeds[0]).items():
        scorers[name] = r
        per_query[name] = _evaluate(r, queries, data.n_items)
    best = max(per_query, key=lambda n: (per_query[n]["valid"]["ndcg@10"].mean()
                                         if len(data.valid) else 0.0, n in towers))
    serve = cfg.serve or max(towers, key=lambda n: np.mean(
        [r["best_valid"] if r["best_valid"] is not None else -1.0
         for r in towers[n].results])) if towers else ""
    if serve and serve not in towers:
        raise ValueError(f"retrieval.serve names {serve!r}, which is not among the trained "
                         f"towers {list(towers)}")
    res = RetrievalResult(towers, serve, best, scorers, per_query, queries)
    res.summary = summarize(res, cfg)
    return res


def two_stage(res: RetrievalResult, data, ranker, make_rows, width: int, cfg) -> None:
    """Add ``two_stage``: the best retriever's top-``width`` re-ranked by ``ranker`` (per test
    query, all and cold targets), and its paired difference against the retriever alone.
    ``make_rows(queries, top)`` gives the ranker's examples of the candidates and the query of
    each row (``pipelines.candidate_examples``)."""
    from recsys.retrieval_metrics import rank_queries, recall_ndcg
    from recsys.scorer import score
    from recsys.two_stage import rerank

    q = res.queries["all"]
    hist = q.histories()
    r = res.retrievers[res.best]
    top = rank_queries(lambda idx: r.scores([hist[i] for i in idx]), q, data.n_items, width)
    rows, query = make_rows(q, top)
    ranked = rerank(score(ranker, rows), query, rows.column("item_id").to_numpy(), len(q),
                    width)
    row_of = {int(u): i for i, u in enumerate(q.users)}
    out = {}
    for sl in ("all", "cold"):
        qs = res.queries[sl]
        idx = np.asarray([row_of[int(u)] for u in qs.users], np.int64)
        out[sl] = recall_ndcg(ranked[idx] if len(idx) else ranked[:0],
                              [qs.targets(u) for u in range(len(qs))])
    res.per_query["two_stage"] = out
    res.summary = summarize(res, cfg, extra_pairs=(("two_stage", res.best),))
    res.summary["two_stage"] = {"retriever": res.best, "candidates": width}


def summarize(res: RetrievalResult, cfg, extra_pairs=()) -> dict:
    rows, pairs = [], []
    for name, slices in res.per_query.items():
        for sl, values in slices.items():
            for m, (v, lo, hi) in bootstrap_mean(values, cfg.bootstrap, 0, cfg.level).items():
                rows.append({"retriever": name, "slice": sl, "metric": m, "value": v,
                             "lo": lo, "hi": hi, "n": int(len(values[m]))})
    for a, b in PAIRS + tuple(extra_pairs):
        if a in res.per_query and b in res.per_query:
            for sl in ("all", "cold"):
                d = paired_difference(res.per_query[a][sl], res.per_query[b][sl],
                                      cfg.bootstrap, 0, cfg.level)
                for m, (v, lo, hi) in d.items():
                    pairs.append({"a": a, "b": b, "slice": sl, "metric": m, "diff": v,
                                  "lo": lo, "hi": hi})
    towers = {n: {"seeds": list(cfg.seeds),
                  "valid_ndcg@10": [r["best_valid"] for r in t.results],
                  "steps": [r["steps"] for r in t.results],
                  "train_seconds": [r["train_seconds"] for r in t.results],
                  "sequences_per_second": [r["sequences_per_second"] for r in t.results]}
              for n, t in res.towers.items()}
    return {"protocol": PROTOCOL, "queries": {sl: len(q) for sl, q in res.queries.items()},
            "serve": res.serve, "best": res.best, "bootstrap": cfg.bootstrap, "level": cfg.level,
            "config": dataclasses.asdict(cfg), "towers": towers, "rows": rows, "pairs": pairs}
