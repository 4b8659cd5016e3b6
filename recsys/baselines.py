"""Baselines scored beside the ranker's arms, in plain PyTorch / pandas (no TorchRec): if the
ranker cannot beat them, the ablation compares undertrained models.

* ``popularity``: each item's smoothed click rate in the training part,
  ``(clicks + a * base) / (impressions + a)``; items without training impressions (cold) get the
  base rate. A probability, so LogLoss and NE mean something.
* ``mf``: logistic matrix factorisation, ``sigmoid(p_u . q_i + b_u + b_i + b)``, Adam, L2 on the
  rows a batch looks up, early stopping on the validation AUC (the best epoch's weights score).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from feature_store.schemas import PREDICTION_KEYS
from recsys.config import MFConfig
from recsys.metrics import auc

log = logging.getLogger(__name__)

BASELINES = ("popularity", "mf")


def read_examples(files: Sequence[str], columns: Sequence[str] = PREDICTION_KEYS) -> pd.DataFrame:
    cols = list(dict.fromkeys(["user_id", "item_id", "label", *columns]))
    return pa.concat_tables([pq.read_table(f, columns=cols) for f in files]).to_pandas()


def popularity_scores(train: pd.DataFrame, scored: pd.DataFrame, smoothing: float = 20.0
                      ) -> np.ndarray:
    base = float(train.label.mean())
    g = train.groupby("item_id").label.agg(["sum", "count"])
    rate = (g["sum"] + smoothing * base) / (g["count"] + smoothing)
    return scored.item_id.map(rate).fillna(base).to_numpy(np.float32)


@dataclass
class MFResult:
    valid_scores: np.ndarray
    test_scores: np.ndarray
    best_epoch: int
    valid_curve: list[float]


def train_mf(train: pd.DataFrame, valid: pd.DataFrame, test: pd.DataFrame, cfg: MFConfig,
             seed: int = 0, item_features: np.ndarray | None = None) -> MFResult:
    """Logistic MF trained on ``train``, early-stopped on ``valid``'s AUC. ``item_features``
    [items, F] (fixed content of each item, by item id): the item vector adds a learned
    projection of them, and the item bias a learned linear function of them, so an item
    without training events is scored by its content."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n_users = int(max(d.user_id.max() for d in (train, valid, test))) + 1
    n_items = int(max(d.item_id.max() for d in (train, valid, test))) + 1
    P = torch.nn.Embedding(n_users, cfg.dim)
    Q = torch.nn.Embedding(n_items, cfg.dim)
    bu = torch.nn.Embedding(n_users, 1)
    bi = torch.nn.Embedding(n_items, 1)
    for e in (P, Q):
        torch.nn.init.normal_(e.weight, std=cfg.init_scale)
    for e in (bu, bi):
        torch.nn.init.zeros_(e.weight)
    b = torch.nn.Parameter(torch.zeros(1))
    params = [P.weight, Q.weight, bu.weight, bi.weight, b]
    feats = None
    if item_features is not None:
        if len(item_features) < n_items:
            raise ValueError(f"item_features has {len(item_features)} rows; item ids reach "
                             f"{n_items - 1}")
        feats = torch.as_tensor(np.asarray(item_features, np.float32))
        W = torch.nn.Linear(feats.shape[1], cfg.dim + 1, bias=False)
        params += [W.weight]
    opt = torch.optim.Adam(params, lr=cfg.lr)

    def tensors(d):
        return (torch.as_tensor(d.user_id.to_numpy(np.int64)),
                torch.as_tensor(d.item_id.to_numpy(np.int64)),
                torch.as_tensor(d.label.to_numpy(np.float32)))

    def logit(u, i):
        q, bias = Q(i), bi(i)[:, 0]
        if feats is not None:
            c = W(feats[i])
            q, bias = q + c[:, 1:], bias + c[:, 0]
        return (P(u) * q).sum(1) + bu(u)[:, 0] + bias + b

    if valid.empty or valid.label.nunique() < 2:
        raise ValueError("the MF baseline early-stops on validation AUC: the validation part "
                         "needs both labels")
    U, I, Y = tensors(train)
    Uv, Iv, Yv = tensors(valid)
    Ut, It, _ = tensors(test)
    best, bad, curve = -1.0, 0, []
    best_v = best_t = None
    best_epoch = 0
    for epoch in range(cfg.max_epochs):
        perm = torch.as_tensor(rng.permutation(len(U)))
        for s in range(0, len(U), cfg.batch_size):
            idx = perm[s:s + cfg.batch_size]
            u, i = U[idx], I[idx]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit(u, i), Y[idx])
            loss = loss + cfg.l2 * (P(u).pow(2).sum() + Q(i).pow(2).sum()) / len(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            v = torch.sigmoid(logit(Uv, Iv)).numpy()
            value = auc(Yv.numpy(), v)
            curve.append(value)
            if value > best + 1e-5:
                best, bad, best_epoch = value, 0, epoch + 1
                best_v, best_t = v, torch.sigmoid(logit(Ut, It)).numpy()
            else:
                bad += 1
        if bad >= cfg.patience:
            break
    return MFResult(best_v.astype(np.float32), best_t.astype(np.float32), best_epoch, curve)


def baseline_predictions(name: str, train_files: Sequence[str], valid_files: Sequence[str],
                         eval_files: Sequence[str], cfg: MFConfig, seed: int = 0
                         ) -> tuple[pa.Table, dict]:
    """Predictions of baseline ``name`` on the validation and evaluation examples, with the
    columns of ``ranker_predictions``, and facts about the fit."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; baselines: {', '.join(BASELINES)}")
    train = read_examples(train_files, ["user_id", "item_id", "label"])
    valid = read_examples(valid_files)
    test = read_examples(eval_files)
    info: dict = {}
    if name == "popularity":
        v, t = popularity_scores(train, valid), popularity_scores(train, test)
    else:
        res = train_mf(train, valid, test, cfg, seed)
        v, t = res.valid_scores, res.test_scores
        info = {"best_epoch": res.best_epoch, "valid_curve": res.valid_curve}
    both = pd.concat([valid.assign(score=v), test.assign(score=t)], ignore_index=True)
    out = pa.Table.from_pandas(both[list(PREDICTION_KEYS) + ["score"]], preserve_index=False)
    out = out.add_column(0, "arm", pa.array([name] * out.num_rows, pa.string()))
    return out, info
