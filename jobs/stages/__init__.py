"""The stages of the daily DAG, one module each: read the declared inputs, call one package
function, write the outputs, return a typed report.

``STAGES`` lists them; the DAG orders them from the tables they read and write
(``jobs.dag.plan_order``), so adding a stage means writing its module and adding it here.
"""

from __future__ import annotations

from jobs.stage import Stage
from jobs.stages import (align, drift, embed, evaluate, examples, ground, ingest, pairs, pretrain,
                         promote, promote_retriever, publish, quantize, quantize_raw, retrieve,
                         split, train, world)

STAGES: tuple[Stage, ...] = (
    world.STAGE, ingest.STAGE, split.STAGE, pretrain.STAGE, ground.STAGE, embed.STAGE,
    pairs.STAGE, drift.STAGE, align.STAGE,
    quantize.STAGE, quantize_raw.STAGE, examples.STAGE, train.STAGE, evaluate.STAGE,
    promote.STAGE, retrieve.STAGE, promote_retriever.STAGE, publish.STAGE,
)


def build_dag(cfg):
    """The DAG of :data:`STAGES` for ``cfg``."""
    from jobs.dag import Dag

    return Dag(cfg, STAGES)
