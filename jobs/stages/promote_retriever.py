"""``promote_retriever``: the promotion gate for the retriever. The tower that wrote this run's
``candidates`` becomes the ``challenger`` of ``qarm-retriever``; it replaces the ``champion`` only
if its lineage is consistent (the codebook and encoder registered with it are the ones it was
trained on, for the towers that read them) and the paired-bootstrap lower bound of its test
Recall@50 difference is above 0: against the champion, each model ranking every item with its own
item features (codes), on the same test queries; against the popularity retriever when there is
no champion yet. Every decision is a row of ``retriever_promotions``."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.stage import Stage, StageContext, StageReport
from jobs.stages.promote import promotions_schema

METRIC = "recall@50"


@dataclass
class PromoteRetrieverReport(StageReport):
    decision: object
    lineage: str = ""

    def text(self) -> str:
        return self.decision.text() + (f"\nlineage of the champion:\n{self.lineage}"
                                       if self.lineage else "")

    def metrics(self) -> dict[str, float]:
        s = self.decision.stats
        return {"promoted": int(self.decision.promoted),
                **({f"recall50_diff.{k}": s[k] for k in ("diff", "lo", "hi")} if s else {})}


def scorer_of(reg, v, n_items: int):
    """A scorer over ``n_items`` items from registered retriever ``v`` (its own features): items
    it does not know score -inf, history items it does not know are dropped."""
    import numpy as np
    import torch

    from recsys.retrievers import Tower
    from recsys.saved import load_retriever

    model, feats = load_retriever(reg.download(v))
    tower = Tower(model, feats)
    known = feats.n_items

    class Scorer:
        def scores(self, histories):
            s = tower.scores([np.asarray(h)[np.asarray(h) < known] for h in histories])
            if known >= n_items:
                return s[:, :n_items]
            pad = torch.full((s.shape[0], n_items - known), -torch.inf)
            return torch.cat([s, pad], dim=1)

    return Scorer()


def compare(reg, chall, champ, queries, data, rcfg):
    from jobs.registry import RETRIEVER, Decision
    from jobs.stages.retrieve import PARENTS
    from recsys.retrieval_metrics import evaluate_queries, paired_difference
    from recsys.retrievers import Popularity

    d = Decision(False, "", str(chall.version), None if champ is None else str(champ.version),
                 model=RETRIEVER, metric="Recall@50")
    if champ is not None and str(champ.version) == str(chall.version):
        d.reason = "the challenger is already the champion"
        return d
    problems = reg.check_lineage(chall, PARENTS.get(chall.tags.get("item_repr"), ()),
                                 RETRIEVER)
    if problems:
        d.reason = "inconsistent lineage: " + "; ".join(problems)
        return d
    hist = queries.histories()

    def metric(r):
        return evaluate_queries(lambda idx: r.scores([hist[i] for i in idx]), queries,
                                data.n_items)[METRIC]

    mine = metric(scorer_of(reg, chall, data.n_items))
    if champ is not None:
        other, d.against = metric(scorer_of(reg, champ, data.n_items)), \
            f"champion v{champ.version}"
    else:
        other, d.against = metric(Popularity(data.popularity)), "popularity (no champion yet)"
    diff, lo, hi = paired_difference({METRIC: mine}, {METRIC: other}, rcfg.bootstrap,
                                     rcfg.seed, rcfg.level)[METRIC]
    d.stats = {"diff": diff, "lo": lo, "hi": hi, "users": len(queries),
               "examples": len(queries), "level": rcfg.level, "bootstrap": rcfg.bootstrap}
    if lo > 0:
        d.promoted, d.reason = True, ("the lower bound of the Recall@50 difference is above 0 "
                                      "and the lineage is consistent")
    else:
        d.reason = (f"the lower bound of the Recall@50 difference ({lo:+.4f}) is not above 0: "
                    "the challenger is not shown to be better")
    return d


def run(ctx: StageContext) -> PromoteRetrieverReport:
    import pyarrow as pa

    from jobs.registry import (CHALLENGER, CHAMPION, RETRIEVER, Decision, Registry,
                               format_lineage)
    from jobs.stages.retrieve import read_events
    from recsys.retrieval_data import retrieval_data

    facts = ctx.io.manifest("candidates").facts
    reg = None
    if not ctx.cfg.mlflow.enabled or not facts.retriever_version:
        d = Decision(False, "the registry is off, or the serving tower was not registered "
                            "(mlflow.enabled, retrieval.register)", model=RETRIEVER)
    else:
        reg = Registry(ctx.cfg)
        chall = reg.version(RETRIEVER, facts.retriever_version)
        reg.set_alias(RETRIEVER, CHALLENGER, chall.version)
        events, n_items = read_events(ctx.io)
        data = retrieval_data(events, n_items, ctx.cfg.retrieval.max_len)
        d = compare(reg, chall, reg.alias(RETRIEVER, CHAMPION), data.test, data,
                    ctx.cfg.registry)
        if d.promoted:
            reg.set_alias(RETRIEVER, CHAMPION, chall.version)
    s = d.stats
    schema = promotions_schema()
    out = ctx.io.write_arrow("retriever_promotions", pa.table({
        "ds": [ctx.ds], "challenger": [d.challenger], "champion_before": [d.champion],
        "against": [d.against], "diff": [s.get("diff")], "lo": [s.get("lo")],
        "hi": [s.get("hi")], "promoted": [d.promoted], "reason": [d.reason]}, schema=schema),
        schema=schema)
    champ = reg.alias(RETRIEVER, CHAMPION) if reg is not None else None
    lineage = format_lineage(reg.lineage(RETRIEVER, champ.version)) if champ else ""
    return PromoteRetrieverReport({"retriever_promotions": out}, d, lineage)


STAGE = Stage(
    "promote_retriever", run, inputs=("candidates", "split_events", "items"),
    outputs=("retriever_promotions",), config=("registry", "retrieval"),
    help="the retriever's promotion gate: the serving tower becomes the challenger and "
         "replaces the champion only with consistent lineage and a paired-bootstrap Recall@50 "
         "gain above 0 on the same test queries (each version with its own codes)")
