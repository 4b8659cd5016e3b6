"""``promote``: the promotion gate. The production arm's newest ranker version (trained on this
run's examples) becomes the ``challenger``; it replaces the ``champion`` only if its lineage is
consistent and the paired-bootstrap lower bound of its test-AUC difference is above 0 (against
the champion, each model scoring the same examples with its own encoder and codes; against the
popularity baseline when there is no champion). Every decision is a row of ``promotions``."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.stage import Stage, StageContext, StageReport


def inputs(cfg) -> tuple[str, ...]:
    # ranker_metrics: decide after the evaluation (and only once the ablation is written).
    return ("eval_examples", "train_examples", "item_features", "ranker_metrics")


@dataclass
class PromoteReport(StageReport):
    decision: object
    lineage: str

    def text(self) -> str:
        return self.decision.text() + (f"\nlineage of the champion:\n{self.lineage}"
                                       if self.lineage else "")

    def metrics(self) -> dict[str, float]:
        s = self.decision.stats
        return {"promoted": int(self.decision.promoted),
                **({f"auc_diff.{k}": s[k] for k in ("diff", "lo", "hi")} if s else {})}


def promotions_schema():
    import pyarrow as pa

    return pa.schema([
        ("ds", pa.string()), ("challenger", pa.string()), ("champion_before", pa.string()),
        ("against", pa.string()), ("diff", pa.float64()), ("lo", pa.float64()),
        ("hi", pa.float64()), ("promoted", pa.bool_()), ("reason", pa.string())])


def score_version(reg, v, rows, ids, feats, present):
    """Click probabilities of ranker version ``v`` on ``rows``, recoded with its own encoder and
    codebook when it reads codes."""
    from recsys.recode import recode_examples
    from recsys.saved import load_ranker
    from recsys.scorer import score

    model = load_ranker(reg.download(v))
    if model.spec.uses_codes:
        rq, vq = codes_of_version(reg, v, ids, feats, present)
        rows = recode_examples(rows, ids, rq, vq)
    return score(model, rows)


def codes_of_version(reg, v, ids, feats, present):
    """(rq, vq) of items ``ids`` coded from their tower features with the encoder and codebook
    registered with ranker version ``v``."""
    import torch

    from jobs.registry import CODEBOOK, ENCODER
    from mm_encoder.item_encoder import ItemEncoder, unpack_features
    from quantizer.codebook import Codebook

    enc = ItemEncoder.load(str(reg.download(reg.version(ENCODER,
                                                        v.tags["encoder_model_version"]))))
    cb_dir = reg.download(reg.version(CODEBOOK, v.tags["codebook_model_version"]))
    cb = Codebook.from_bytes((cb_dir / "codebook.npz").read_bytes())
    with torch.no_grad():
        emb = enc.fusion(unpack_features(feats, present, enc.towers.dims())).numpy()
    return cb.encode(ids, emb)


@dataclass
class GateData:
    """What the gate scores: the test examples, every item's tower features, and the training
    examples (for the popularity baseline)."""
    rows: object
    ids: object
    feats: object
    present: object
    train: object

    @classmethod
    def read(cls, read_arrow) -> "GateData":
        """``read_arrow(table, columns=None)``: a stage's inputs or a store's latest."""
        import numpy as np
        import pyarrow.compute as pc

        from feature_store.arrays import list_matrix

        rows = read_arrow("eval_examples")
        feats_t = read_arrow("item_features").sort_by("item_id")
        return cls(rows.filter(pc.equal(rows.column("part"), "test")),
                   feats_t.column("item_id").to_numpy(),
                   list_matrix(feats_t.column("features"), np.float32),
                   list_matrix(feats_t.column("present"), bool),
                   read_arrow("train_examples", columns=["item_id", "label"]).to_pandas())


def compare(reg, chall, champ, data: GateData, rcfg):
    """The gate's decision on ``chall`` against ``champ`` (None: the popularity baseline); moves
    no alias."""
    from jobs.registry import Decision
    from recsys.baselines import popularity_scores
    from recsys.recode import paired_difference

    d = Decision(False, "", str(chall.version), None if champ is None else str(champ.version))
    if champ is not None and str(champ.version) == str(chall.version):
        d.reason = "the challenger is already the champion"
        return d
    problems = reg.check_lineage(chall)
    if problems:
        d.reason = "inconsistent lineage: " + "; ".join(problems)
        return d
    args = (data.rows, data.ids, data.feats, data.present)
    mine = score_version(reg, chall, *args)
    if champ is not None:
        other, d.against = score_version(reg, champ, *args), f"champion v{champ.version}"
    else:
        other = popularity_scores(data.train, data.rows.select(["item_id"]).to_pandas())
        d.against = "popularity (no champion yet)"
    d.stats = paired_difference(data.rows.column("user_id").to_numpy(),
                                data.rows.column("label").to_numpy(), mine, other,
                                rcfg.bootstrap, rcfg.level, rcfg.seed)
    if d.stats["lo"] > 0:
        d.promoted, d.reason = True, ("the lower bound of the AUC difference is above 0 and the "
                                      "lineage is consistent")
    else:
        d.reason = (f"the lower bound of the AUC difference ({d.stats['lo']:+.4f}) is not above "
                    "0: the challenger is not shown to be better")
    return d


def decide(ctx: StageContext, reg):
    """Name this run's challenger, run the gate, move ``champion`` when it passes."""
    from jobs.registry import CHALLENGER, CHAMPION, RANKER, Decision

    cfg = ctx.cfg
    examples = ctx.io.manifest("train_examples").ref        # the ranker's `examples` tag
    chall = reg.find(RANKER, arm=cfg.registry.arm, examples=examples)
    if chall is None:
        return Decision(False, f"no {RANKER} version of arm {cfg.registry.arm} trained on "
                               f"{examples} (is {cfg.registry.arm} in train.arms, and "
                               "train.register on?)")
    reg.set_alias(RANKER, CHALLENGER, chall.version)
    d = compare(reg, chall, reg.alias(RANKER, CHAMPION),
                GateData.read(lambda t, columns=None: ctx.io.arrow(t, columns=columns)),
                cfg.registry)
    if d.promoted:
        reg.set_alias(RANKER, CHAMPION, chall.version)
    return d


def run(ctx: StageContext) -> PromoteReport:
    import pyarrow as pa

    from jobs.registry import CHAMPION, RANKER, Decision, Registry, format_lineage

    if not (ctx.cfg.mlflow.enabled and ctx.cfg.train.register):
        decision, reg = Decision(False, "the registry is off (mlflow.enabled and "
                                        "train.register)"), None
    else:
        reg = Registry(ctx.cfg)
        decision = decide(ctx, reg)
    s = decision.stats
    out = ctx.io.write_arrow("promotions", pa.table({
        "ds": [ctx.ds], "challenger": [decision.challenger],
        "champion_before": [decision.champion], "against": [decision.against],
        "diff": [s.get("diff")], "lo": [s.get("lo")], "hi": [s.get("hi")],
        "promoted": [decision.promoted], "reason": [decision.reason]},
        schema=promotions_schema()), schema=promotions_schema())
    champ = reg.alias(RANKER, CHAMPION) if reg is not None else None
    lineage = format_lineage(reg.lineage(RANKER, champ.version)) if champ is not None else ""
    return PromoteReport({"promotions": out}, decision, lineage)


STAGE = Stage(
    "promote", run, inputs=inputs, outputs=("promotions",), config=("registry",),
    help="the promotion gate: the production arm's new ranker becomes the challenger and "
         "replaces the champion only with consistent lineage and a paired-bootstrap AUC gain "
         "above 0 on the same test examples (each model with its own encoder and codes)")
