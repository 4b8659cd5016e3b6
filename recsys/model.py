"""The ranker: TorchRec embedding tables + target attention + prefix-matched history + DCN + MLP.

Per example, an item (the target, or a history item) is represented by the concatenation of its
part embeddings: item id and, for the code arms, its RQ code at each level (one table per level,
shared by target and history). Then:

* **target attention** (DIN-style): scaled dot product of the projected target with the projected
  history items, masked to the real positions, softmax-weighted sum of the history;
* **prefix-matched history**: the mean of the history items whose level-1 (and level-1..2) RQ
  code equals the target's, two features (QARM's cross features); zero when none match;
* user id embedding, the VQ code bag (mean of its code embeddings), log history length;
* optionally (``model.pred_tags``) the mean of the target's predicted-tag embeddings;
* frozen arms (the cascade): the frozen content vector, normalised and projected, is one more
  part of every item's representation: the target's comes with the example, the history items'
  from ``frozen_table``, a non-trainable buffer of the content embeddings by item id;
* DCN-v2 cross layers (low rank) over the concatenation, an MLP, one logit; BCE loss.

The forward is torch.fx traceable (``TrainPipelineSparseDist`` traces it): no Python loops over
tensors or jagged rows; history is padded with fbgemm's jagged→dense op. It returns
``(loss, (loss, logits, labels))`` as the pipeline expects.

The sparse lookups sit behind ``SparseArch`` so the same dense architecture can run on TorchRec
(``TorchRecSparse``) or on plain ``nn.Embedding``/``nn.EmbeddingBag`` (``PlainSparse``, used by
the benchmark as the hand-written baseline).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import (EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection,
                      EmbeddingConfig, PoolingType)

from recsys.config import ModelConfig
from recsys.data import RankerBatch
from recsys.features import FeatureSpec


# --------------------------------------------------------------------------- sparse archs


class TorchRecSparse(nn.Module):
    """TorchRec tables: an EmbeddingCollection for target + history features, an
    EmbeddingBagCollection for pooled bags (user id, VQ codes)."""

    def __init__(self, spec: FeatureSpec, device: torch.device | str = "cpu",
                 ec_device: torch.device | str | None = None):
        super().__init__()
        self.spec = spec
        self.ec = EmbeddingCollection(
            tables=[EmbeddingConfig(name=t.name, embedding_dim=t.dim,
                                    num_embeddings=t.num_embeddings,
                                    feature_names=list(t.features))
                    for t in spec.sequence_tables],
            device=torch.device(ec_device or device))
        self.ebc = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=t.name, embedding_dim=t.dim,
                                       num_embeddings=t.num_embeddings,
                                       feature_names=list(t.features),
                                       pooling=PoolingType.MEAN if t.pooling == "mean"
                                       else PoolingType.SUM)
                    for t in spec.bag_tables],
            device=torch.device(device))

    def forward(self, batch: RankerBatch) -> dict[str, torch.Tensor]:
        """{feature: [B, d] for singles and bags, [B, N, d] for histories}."""
        seq = self.ec(batch.seq)
        pooled = self.ebc(batch.pooled)
        n = self.spec.history_len
        out: dict[str, torch.Tensor] = {}
        dedup = {t.name: k for k, t in enumerate(self.spec.dedup_tables)}
        for t in self.spec.sequence_tables:
            cand, hist = t.features
            if t.name in dedup:
                # Each distinct id's row, then each example's target and history gathered
                # from them (the index's padding points at an appended zero row).
                rows = seq[cand].values()
                rows = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
                # index_select: its backward is an index_add_, ~20x cheaper on CPU than
                # advanced indexing's accumulating index_put_.
                idx = batch.seq_index[dedup[t.name]]                             # [B, 1+N]
                gathered = rows.index_select(0, idx.flatten()).view(
                    idx.shape[0], idx.shape[1], rows.shape[1])                   # [B, 1+N, d]
                out[cand] = gathered[:, 0]
                out[hist] = gathered[:, 1:]
                continue
            out[cand] = seq[cand].values()
            jt = seq[hist]
            out[hist] = torch.ops.fbgemm.jagged_to_padded_dense(
                jt.values(), [jt.offsets()], [n], 0.0)
        for t in self.spec.bag_tables:
            out[t.features[0]] = pooled[t.features[0]]
        return out


class PlainSparse(nn.Module):
    """The same lookups with ``nn.Embedding`` / ``nn.EmbeddingBag`` (what a user writes by
    hand); ``sparse=True`` gives sparse gradients for SparseAdam / sparse Adagrad."""

    def __init__(self, spec: FeatureSpec, sparse: bool = True):
        super().__init__()
        if spec.dedup_ids:
            raise ValueError("PlainSparse reads every id occurrence: build its batches from a "
                             "spec with dedup_ids=False")
        self.spec = spec
        self.emb = nn.ModuleDict({t.name: nn.Embedding(t.num_embeddings, t.dim, sparse=sparse)
                                  for t in spec.sequence_tables})
        self.bags = nn.ModuleDict({t.name: nn.EmbeddingBag(t.num_embeddings, t.dim,
                                                           mode=t.pooling, sparse=sparse)
                                   for t in spec.bag_tables})

    def forward(self, batch: RankerBatch) -> dict[str, torch.Tensor]:
        n = self.spec.history_len
        seq = batch.seq.to_dict()
        pooled = batch.pooled.to_dict()
        out: dict[str, torch.Tensor] = {}
        for t in self.spec.sequence_tables:
            cand, hist = t.features
            table = self.emb[t.name]
            out[cand] = table(seq[cand].values())
            jt = seq[hist]
            out[hist] = torch.ops.fbgemm.jagged_to_padded_dense(
                table(jt.values()), [jt.offsets()], [n], 0.0)
        for t in self.spec.bag_tables:
            jt = pooled[t.features[0]]
            out[t.features[0]] = self.bags[t.name](jt.values(), jt.offsets().long()[:-1])
        return out


# --------------------------------------------------------------------------- dense arch


class Dropout(nn.Module):
    """Inverted dropout with its mask drawn from ``rand_like``: the distribution of
    ``nn.Dropout``, at half its cost per step on CPU (torch's ``bernoulli_`` kernel is slow)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return x * (torch.rand_like(x) >= self.p).to(x.dtype).mul_(1.0 / (1.0 - self.p))


class CrossNet(nn.Module):
    """DCN-v2 low-rank cross layers: x_{l+1} = x_0 * (U (V x_l) + b) + x_l."""

    def __init__(self, width: int, layers: int, rank: int):
        super().__init__()
        self.v = nn.ModuleList(nn.Linear(width, rank, bias=False) for _ in range(layers))
        self.u = nn.ModuleList(nn.Linear(rank, width) for _ in range(layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for v, u in zip(self.v, self.u):
            x = x0 * u(v(x)) + x
        return x


class OverArch(nn.Module):
    def __init__(self, spec: FeatureSpec, cfg: ModelConfig):
        super().__init__()
        self.spec = spec
        self.dot = cfg.dot
        self.bias = cfg.bias
        self.detach_history = cfg.detach_history
        d = spec.dim
        self.n_parts = len(spec.item_parts) + spec.frozen_slots     # slots of width d per item
        item_w = d * self.n_parts
        self.q = nn.Linear(item_w, cfg.attention_dim, bias=False)
        self.k = nn.Linear(item_w, cfg.attention_dim, bias=False)
        self.scale = 1.0 / math.sqrt(cfg.attention_dim)
        width = d + 2 * item_w + 1            # user, target, attention pool, log history length
        if spec.uses_codes or spec.uses_frozen:
            # Two prefix- (or similarity-) matched pools, the VQ bag (or its frozen analogue).
            width += 2 * item_w + d
        if spec.uses_pred_tags:
            width += d
        self.frozen = self.frozen_bag = None
        if spec.uses_frozen:
            # Content vectors arrive at whatever scale their encoder produced: normalise them.
            D = spec.frozen_dim
            self.register_buffer("frozen_table", torch.zeros(spec.frozen_rows, D))
            self.frozen = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, d * spec.frozen_slots))
            if not spec.uses_codes:
                self.frozen_bag = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, d))
                self.register_buffer("thresholds", torch.tensor(list(spec.match_thresholds),
                                                                dtype=torch.float32))
        self.dropout = Dropout(cfg.dropout)
        self.cross = CrossNet(width, cfg.cross_layers, cfg.cross_rank)
        layers: list[nn.Module] = []
        w = width
        for h in cfg.mlp:
            layers += [nn.Linear(w, h), nn.ReLU()]
            w = h
        layers.append(nn.Linear(w, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, emb: dict[str, torch.Tensor], batch: RankerBatch) -> torch.Tensor:
        parts = self.spec.item_parts
        t_parts = [emb["item_id"]] + [emb[p] for p in parts[1:]]
        h_parts = [emb["hist_item_id"]] + [emb[f"hist_{p}"] for p in parts[1:]]
        if self.detach_history:
            h_parts = [h.detach() for h in h_parts]
        mask = batch.hist_mask                                                   # [B, N]
        if self.frozen is not None:
            t_vec = self.frozen_table[batch.item_ids]                            # [B, D]
            h_vec = self.frozen_table[batch.hist_ids]                            # [B, N, D]
            t_parts.append(self.frozen(t_vec))
            h_parts.append(self.frozen(h_vec))
        target = torch.cat(t_parts, dim=1)                                       # [B, W]
        hist = torch.cat(h_parts, dim=2)                                         # [B, N, W]
        scores = torch.einsum("bd,bnd->bn", self.q(target), self.k(hist)) * self.scale
        scores = scores.masked_fill(mask == 0, -1e9)
        weights = torch.softmax(scores, dim=1) * mask            # all-zero rows: no history
        att = torch.einsum("bn,bnd->bd", weights, hist)
        hist_len = mask.sum(1, keepdim=True)
        user = emb["user_id"]
        feats = [user, target, att, torch.log1p(hist_len)]
        pm = None
        if self.spec.uses_codes:
            pm = batch.prefix_mask                                               # [B, N, 2]
        elif self.frozen_bag is not None:
            # Similarity-matched history: the frozen analogue of the code prefix match.
            cos = torch.einsum("bd,bnd->bn", F.normalize(t_vec, dim=1),
                               F.normalize(h_vec, dim=2))
            pm = (cos.unsqueeze(2) >= self.thresholds).float() * mask.unsqueeze(2)
            # Items without a content vector (zero rows) match nothing.
            has_t = (t_vec.abs().sum(1) > 0).float()
            has_h = (h_vec.abs().sum(2) > 0).float()
            pm = pm * has_t[:, None, None] * has_h.unsqueeze(2)
        if pm is not None:
            pooled = torch.einsum("bnk,bnd->bkd", pm, hist) / pm.sum(1).clamp(min=1.0
                                                                               ).unsqueeze(2)
            feats.append(pooled.flatten(1))
            feats.append(emb["vq"] if self.spec.uses_codes else self.frozen_bag(t_vec))
        if self.spec.uses_pred_tags:
            feats.append(emb["pred_tags"])
        x = torch.cat(feats, dim=1)
        logit = self.mlp(self.cross(self.dropout(x))).squeeze(1)
        if self.dot:
            # An explicit user x item term (an MLP learns dot products poorly): the user's
            # vector against the sum of the target's parts; with ``bias``, their first values
            # are the user's and the item's biases and the rest is the dot product.
            item = target.view(-1, self.n_parts, self.spec.dim).sum(1)
            if self.bias:
                logit = logit + (user[:, 1:] * item[:, 1:]).sum(1) + user[:, 0] + item[:, 0]
            else:
                logit = logit + (user * item).sum(1)
        return logit


class Ranker(nn.Module):
    """Sparse arch + over arch + BCE (+ L2 on the looked-up trainable rows of the user and the
    target); ``forward`` returns ``(loss, (loss, logits, labels))``."""

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig, sparse: nn.Module,
                 dense_device: torch.device | str = "cpu"):
        super().__init__()
        self.spec = spec
        self.l2 = cfg.l2
        self.sparse = sparse
        self.over = OverArch(spec, cfg).to(dense_device)
        self._l2_keys = ["user_id", "item_id"] + [p for p in spec.item_parts[1:]] + (
            ["vq"] if spec.uses_codes else [])

    def forward(self, batch: RankerBatch):
        emb = self.sparse(batch)
        logits = self.over(emb, batch)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        if self.l2 > 0:
            penalty = sum(emb[k].pow(2).sum() for k in self._l2_keys)
            loss = loss + self.l2 * penalty / batch.labels.shape[0]
        return loss, (loss.detach(), logits.detach(), batch.labels)


def init_tables(sparse: nn.Module, scale: float) -> None:
    """Every embedding table on one scale, N(0, scale^2): TorchRec's default, uniform within
    +-sqrt(1/rows), would start a 33-row code table ~7x larger than a 1,500-row id table."""
    with torch.no_grad():
        for p in sparse.parameters():
            nn.init.normal_(p, std=scale)


def build_ranker(spec: FeatureSpec, cfg: ModelConfig, device: str = "cpu",
                 ec_device: str | None = None, frozen_table: torch.Tensor | None = None
                 ) -> Ranker:
    """The TorchRec ranker. Pass ``device="meta"`` to let DistributedModelParallel materialize
    the tables shard by shard (``ec_device``: where the EmbeddingCollection is built; on CPU its
    fused sharded kernel cannot be materialized from ``meta`` in torchrec 1.9, so it is built
    on ``cpu``)."""
    model = Ranker(spec, cfg, TorchRecSparse(spec, device, ec_device),
                   "cpu" if device == "meta" else device)
    if device != "meta":
        init_tables(model.sparse, cfg.init_scale)
    if frozen_table is not None:
        if model.over.frozen is None:
            raise ValueError(f"arm {spec.arm} takes no frozen table")
        if tuple(frozen_table.shape) != tuple(model.over.frozen_table.shape):
            raise ValueError(f"frozen table {tuple(frozen_table.shape)} does not match the spec "
                             f"{tuple(model.over.frozen_table.shape)}")
        model.over.frozen_table.copy_(frozen_table)
    return model
