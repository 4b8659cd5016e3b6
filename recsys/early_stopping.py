"""Early stopping on the validation part, inside a distributed run: every rank scores its
share of the validation examples, the scores are gathered so every rank computes the same metric
and takes the same decision; the best weights are kept as rank-local copies
(``checkpoint.local_pieces``)."""

from __future__ import annotations

from recsys.job import TrainJob


class EarlyStopping:
    """Tracks the validation metric; ``update`` says whether it improved. Its state is plain
    data (kept in checkpoints)."""

    def __init__(self, metric: str, patience: int, state: dict | None = None):
        if metric not in ("auc", "logloss", "ndcg"):
            raise ValueError(f"valid_metric must be auc, logloss or ndcg, got {metric!r}")
        self.metric, self.patience = metric, patience
        st = state or {}
        self.best = st.get("best")
        self.best_step = st.get("best_step", 0)
        self.bad = st.get("bad", 0)
        self.history: list[list[float]] = st.get("history", [])

    def update(self, step: int, value: float) -> bool:
        """Record ``value`` at ``step``; True when it is the best so far (NaN never is)."""
        import math

        self.history.append([step, value])
        better = not math.isnan(value) and (
            self.best is None or (value > self.best + 1e-5 if self.metric != "logloss"
                                  else value < self.best - 1e-5))
        if better:
            self.best, self.best_step, self.bad = value, step, 0
        else:
            self.bad += 1
        return better

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad,
                "history": self.history}


def validate(dmp, job: TrainJob, spec, device, world: int, rank: int) -> float:
    """The validation metric of the current weights (every rank returns the same value)."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from recsys.data import ShardPlan, count_rows, eval_batches
    from recsys.metrics import auc, logloss

    dmp.eval()
    labels, scores = [], []
    plan = ShardPlan(count_rows(job.valid_files), job.micro_batch, world)
    with torch.no_grad():
        for batch, rows_t in eval_batches(job.valid_files, spec, plan, rank):
            _, (_, logits, _) = dmp(batch.to(device))
            n = rows_t.num_rows
            if n:
                labels.append(batch.labels[:n].numpy())
                scores.append(torch.sigmoid(logits[:n].float()).cpu().numpy())
    mine = (np.concatenate(labels) if labels else np.zeros(0, np.float32),
            np.concatenate(scores) if scores else np.zeros(0, np.float32))
    every = [None] * world
    dist.all_gather_object(every, mine)
    y = np.concatenate([e[0] for e in every])
    p = np.concatenate([e[1] for e in every])
    dmp.train()
    return auc(y, p) if job.valid_metric == "auc" else logloss(y, p)
