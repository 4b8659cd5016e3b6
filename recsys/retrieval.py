"""The sequential retriever: a SASRec-style user tower over an item tower on TorchRec tables.

**Item tower.** An item's vector is the sum of its parts, each a ``dim``-wide embedding:

* ``ids``: its id row;
* ``codes``: one row per RQ level (per-level tables; row 0 is "not coded") and the mean of its
  VQ bag (the ids of its nearest items in the aligned space), all trainable: QARM's codes;
* ``ids+codes``: both;
* ``frozen_aligned``: the aligned content vector, frozen, through a trainable LayerNorm + Linear
  (the cascade's retriever: content only, nothing per item is learned).

The sparse parts are one ``EmbeddingBagCollection`` (SUM for single ids, MEAN for the VQ bag),
sharded by ``DistributedModelParallel``. A batch looks up each *distinct* item of the batch once
(its inputs, targets and sampled negatives; a fixed number of rows so every rank's KJT has the
same stride, the unused rows empty) and indexes the result.

**User tower** (SASRec): the item vectors of the user's last ``max_len`` positives, right-aligned,
plus learned position embeddings, through ``blocks`` causal pre-norm transformer blocks (padding
keys masked; a position always sees itself, so no row of the attention is empty). The output at
each position is the user state that predicts the next positive; at inference the last position's
output is the user vector.

**Loss.** Sampled softmax over cosine similarities / temperature, trained at every position: the
candidates are the distinct items of the micro-batch (in-batch negatives) plus ``sampled``
items drawn uniformly from the training corpus (items with a training positive), and each
candidate's logit is lowered by the log of its chance of being a candidate,
``q_i = min(1, m p_i + M / n)`` (``m`` item occurrences in the batch, ``p_i`` the item's share
of training positives, ``M`` samples over the ``n`` corpus items): the logQ correction (Yi et al.
2019), without which in-batch negatives push popular items down. Items without a training
positive (cold items) are never candidates: sampled as negatives with their small ``q`` they
would be pushed below everything, and a cold item could never be retrieved through the codes it
shares with warm items. Other positives of
the same user are not masked out of the candidates (they are rare at these batch sizes).

Vectors are L2-normalised, so retrieval is a maximum inner product search (faiss, inner
product metric) and the score is a cosine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.model import Dropout


class RetrievalError(ValueError):
    """The retriever cannot be built or trained from these inputs."""


@dataclass
class ItemFeatures:
    """Per-item inputs of the item tower, indexed by the dense item id."""

    n_items: int
    rq: np.ndarray               # [n, L] int32, -1 where not coded
    vq_offsets: np.ndarray       # [n + 1] int64
    vq_values: np.ndarray        # int32 item ids
    codes_per_level: int
    #: Training positives per item (the logQ correction, the popularity baseline).
    popularity: np.ndarray       # [n] int64

    @property
    def levels(self) -> int:
        return int(self.rq.shape[1])

    @property
    def corpus(self) -> np.ndarray:
        """The items negatives are sampled from: those with a training positive (all items
        when none has one)."""
        c = np.flatnonzero(self.popularity > 0)
        return c if len(c) else np.arange(self.n_items)

    @classmethod
    def build(cls, n_items: int, code_ids, rq, vq, codes_per_level: int,
              popularity: np.ndarray) -> "ItemFeatures":
        rq_a = np.full((n_items, len(rq[0]) if len(rq) else 1), -1, np.int32)
        code_ids = np.asarray(code_ids, np.int64)
        if len(code_ids):
            rq_a[code_ids] = np.asarray([list(r) for r in rq], np.int32)
        lens = np.zeros(n_items, np.int64)
        lens[code_ids] = [len(v) for v in vq]
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        values = np.zeros(int(offsets[-1]), np.int32)
        for i, v in zip(code_ids, vq):
            values[offsets[i]:offsets[i + 1]] = v
        if rq_a.max(initial=-1) >= codes_per_level:
            raise RetrievalError(f"an RQ code ({int(rq_a.max())}) is not below the codes per "
                                 f"level ({codes_per_level})")
        if len(values) and (values.min() < 0 or values.max() >= n_items):
            raise RetrievalError(f"a VQ bag names an item outside 0..{n_items - 1}")
        return cls(n_items, rq_a, offsets, values, int(codes_per_level),
                   np.asarray(popularity, np.int64))


def feature_names(item_repr: str, levels: int) -> list[str]:
    names = []
    if item_repr in ("ids", "ids+codes"):
        names.append("item_id")
    if item_repr in ("codes", "ids+codes"):
        names += [f"rq_{level}" for level in range(levels)] + ["vq"]
    return names


def tables(item_repr: str, feats: ItemFeatures, dim: int) -> list[EmbeddingBagConfig]:
    out = []
    for name in feature_names(item_repr, feats.levels):
        rows = feats.codes_per_level + 1 if name.startswith("rq_") else feats.n_items
        out.append(EmbeddingBagConfig(
            name=f"t_{name}", embedding_dim=dim, num_embeddings=max(rows, 1),
            feature_names=[name], pooling=PoolingType.MEAN if name == "vq" else PoolingType.SUM))
    return out


def item_kjt(ids: np.ndarray, feats: ItemFeatures, names: list[str], stride: int
             ) -> KeyedJaggedTensor:
    """The sparse features of ``ids`` (distinct item ids), padded with empty rows to
    ``stride`` rows: every rank's KJT has the same batch size."""
    n = len(ids)
    if n > stride:
        raise RetrievalError(f"{n} items do not fit a lookup of {stride} rows")
    values, lengths = [], []
    pad = np.zeros(stride - n, np.int64)
    for name in names:
        if name == "item_id":
            v, ln = ids, np.ones(n, np.int64)
        elif name == "vq":
            starts, ends = feats.vq_offsets[ids], feats.vq_offsets[ids + 1]
            ln = ends - starts
            v = (feats.vq_values[np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)])]
                 if ln.sum() else np.zeros(0, np.int64))
        else:
            v, ln = feats.rq[ids, int(name[3:])].astype(np.int64) + 1, np.ones(n, np.int64)
        values.append(np.asarray(v, np.int64))
        lengths.append(np.concatenate([ln, pad]))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=names, values=torch.from_numpy(np.concatenate(values) if values else
                                            np.zeros(0, np.int64)),
        lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)))


@dataclass
class RetrievalBatch:
    kjt: KeyedJaggedTensor | None
    uniq: torch.Tensor        # [K] item id of each looked-up row (0 on empty rows)
    valid: torch.Tensor       # [K] bool: a real row
    seq_idx: torch.Tensor     # [B, L] row of each input position (the empty last row on pads)
    seq_mask: torch.Tensor    # [B, L] bool
    tgt_idx: torch.Tensor     # [B, L] row of the next positive, -1 where none
    logq: torch.Tensor        # [K] log chance of each row being a candidate

    def to(self, device) -> "RetrievalBatch":
        return RetrievalBatch(*(None if v is None else v.to(device) for v in
                                (self.kjt, self.uniq, self.valid, self.seq_idx, self.seq_mask,
                                 self.tgt_idx, self.logq)))


def right_align(seqs: list[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each sequence's last ``width`` items, right-aligned (padding on the left, -1)."""
    out = np.full((len(seqs), width), -1, np.int64)
    for r, s in enumerate(seqs):
        s = np.asarray(s[-width:], np.int64)
        if len(s):
            out[r, width - len(s):] = s
    return out, out >= 0


def lookup_rows(micro_batch: int, max_len: int, sampled: int, n_items: int | None = None) -> int:
    """Rows of every lookup: all items of a full micro-batch and the samples (never more than
    the catalogue's ``n_items`` distinct items), plus one empty row. Every row is a column of
    the loss's logits, so a small catalogue must not pay for a wide batch."""
    rows = micro_batch * (max_len + 1) + sampled
    return (rows if n_items is None else min(rows, n_items)) + 1


def make_batch(seqs: list[np.ndarray], feats: ItemFeatures, names: list[str], max_len: int,
               sampled: int, stride: int, rng: np.random.Generator) -> RetrievalBatch:
    """A training batch from whole sequences (inputs ``s[:-1]``, targets ``s[1:]``)."""
    both, _ = right_align(seqs, max_len + 1)
    inp, tgt = both[:, :-1], both[:, 1:]
    real = both[both >= 0]
    corpus = feats.corpus
    samples = corpus[rng.integers(0, len(corpus), sampled)]
    uniq = np.unique(np.concatenate([real, samples]))
    pop = feats.popularity / max(feats.popularity.sum(), 1)
    q = np.minimum(1.0, len(real) * pop[uniq] + sampled / len(corpus))
    K = len(uniq)
    logq = np.zeros(stride, np.float32)
    logq[:K] = np.log(q)
    empty = stride - 1

    def rows(a):
        r = np.searchsorted(uniq, np.maximum(a, 0))
        return np.where(a >= 0, r, -1)

    seq_idx = rows(inp)
    tgt_idx = np.where(inp >= 0, rows(tgt), -1)      # a target only after a real input
    uniq_pad = np.zeros(stride, np.int64)
    uniq_pad[:K] = uniq
    valid = np.zeros(stride, bool)
    valid[:K] = True
    return RetrievalBatch(
        item_kjt(uniq, feats, names, stride) if names else None, torch.from_numpy(uniq_pad),
        torch.from_numpy(valid), torch.from_numpy(np.where(seq_idx >= 0, seq_idx, empty)),
        torch.from_numpy(inp >= 0), torch.from_numpy(tgt_idx), torch.from_numpy(logq))


class ItemTower(nn.Module):
    def __init__(self, item_repr: str, feats: ItemFeatures, dim: int,
                 frozen: torch.Tensor | None = None, device: str | torch.device = "cpu"):
        super().__init__()
        self.item_repr, self.dim = item_repr, dim
        cfgs = tables(item_repr, feats, dim)
        self.ebc = (EmbeddingBagCollection(tables=cfgs, device=torch.device(device))
                    if cfgs else None)
        self.proj = None
        if item_repr == "frozen_aligned":
            if frozen is None:
                raise RetrievalError("the frozen_aligned tower needs the aligned embeddings")
            self.register_buffer("frozen_table", frozen.float())
            self.proj = nn.Sequential(nn.LayerNorm(frozen.shape[1]),
                                      nn.Linear(frozen.shape[1], dim))

    def forward(self, kjt: KeyedJaggedTensor | None, uniq: torch.Tensor) -> torch.Tensor:
        """[K, dim] vectors of the looked-up rows (not normalised)."""
        parts = []
        if self.ebc is not None:
            kt = self.ebc(kjt)
            v = kt.values()                                          # [K, dim * features]
            parts.append(v.view(v.shape[0], -1, self.dim).sum(1))
        if self.proj is not None:
            parts.append(self.proj(self.frozen_table[uniq]))
        return parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)


class UserTower(nn.Module):
    """SASRec: positions + causal pre-norm transformer blocks over the history's vectors."""

    def __init__(self, dim: int, max_len: int, blocks: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.pos = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=dropout,
                                           batch_first=True, norm_first=True)
        # The blocks' residual and feed-forward dropouts draw their masks with ``rand_like``
        # (recsys.model.Dropout: nn.Dropout's distribution at half its CPU cost); the attention
        # weights' dropout stays inside the attention kernel. No parameters change.
        for name in ("dropout", "dropout1", "dropout2"):
            setattr(layer, name, Dropout(dropout))
        self.blocks = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.drop = Dropout(dropout)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``h`` [B, L, d] (right-aligned), ``mask`` [B, L] -> user states [B, L, d]."""
        B, L, _ = h.shape
        x = self.drop(h * mask.unsqueeze(2) + self.pos.weight[-L:].unsqueeze(0))
        causal = torch.ones(L, L, dtype=torch.bool, device=h.device).triu(1)   # True = blocked
        blocked = causal.unsqueeze(0) | ~mask.unsqueeze(1)                       # [B, L, L]
        blocked = blocked & ~torch.eye(L, dtype=torch.bool, device=h.device).unsqueeze(0)
        att = blocked.repeat_interleave(self.heads, dim=0)
        return self.norm(self.blocks(x, mask=att))


class Retriever(nn.Module):
    """Item tower + user tower + sampled softmax; ``forward(batch)`` returns ``(loss, n)``."""

    def __init__(self, item_repr: str, feats: ItemFeatures, dim: int, max_len: int,
                 blocks: int, heads: int, dropout: float, temperature: float,
                 frozen: torch.Tensor | None = None, device: str | torch.device = "cpu"):
        super().__init__()
        self.item_repr, self.max_len, self.temperature = item_repr, max_len, temperature
        self.names = feature_names(item_repr, feats.levels)
        self.items = ItemTower(item_repr, feats, dim, frozen, device)
        self.user = UserTower(dim, max_len, blocks, heads, dropout)

    def forward(self, batch: RetrievalBatch):
        raw = self.items(batch.kjt, batch.uniq)                               # [K, d]
        vec = F.normalize(raw, dim=1)
        states = F.normalize(self.user(raw[batch.seq_idx], batch.seq_mask), dim=2)
        has = batch.tgt_idx >= 0
        u = states[has]                                                       # [P, d]
        logits = u @ vec.T / self.temperature - batch.logq.unsqueeze(0)
        logits = logits.masked_fill(~batch.valid.unsqueeze(0), -1e9)
        loss = F.cross_entropy(logits, batch.tgt_idx[has])
        return loss, has.sum()

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def item_vectors(self, feats: ItemFeatures, ids: np.ndarray, chunk: int = 4096
                     ) -> torch.Tensor:
        """Normalised vectors of ``ids`` (an unsharded model)."""
        out = []
        for a in range(0, len(ids), chunk):
            part = np.asarray(ids[a:a + chunk], np.int64)
            kjt = item_kjt(part, feats, self.names, len(part)) if self.names else None
            out.append(F.normalize(self.items(kjt, torch.from_numpy(part)), dim=1))
        return torch.cat(out) if out else torch.zeros(0, self.user.pos.weight.shape[1])

    @torch.no_grad()
    def user_vectors(self, raw_items: torch.Tensor, histories: list[np.ndarray],
                     chunk: int = 512) -> torch.Tensor:
        """Normalised user vectors from ``raw_items`` (every item's unnormalised vector, by
        item id) and each user's positives, oldest first."""
        out = []
        for a in range(0, len(histories), chunk):
            ids, mask = right_align(histories[a:a + chunk], self.max_len)
            h = raw_items[torch.from_numpy(np.maximum(ids, 0))]
            out.append(F.normalize(self.user(h, torch.from_numpy(mask))[:, -1], dim=1))
        return torch.cat(out) if out else torch.zeros(0, raw_items.shape[1])

    @torch.no_grad()
    def raw_item_vectors(self, feats: ItemFeatures, chunk: int = 4096) -> torch.Tensor:
        """Every item's unnormalised vector (the user tower's input), by item id."""
        ids = np.arange(feats.n_items)
        out = []
        for a in range(0, len(ids), chunk):
            part = ids[a:a + chunk]
            kjt = item_kjt(part, feats, self.names, len(part)) if self.names else None
            out.append(self.items(kjt, torch.from_numpy(part)))
        return torch.cat(out)


def init_tables(model: Retriever, scale: float) -> None:
    if model.items.ebc is not None:
        with torch.no_grad():
            for p in model.items.ebc.parameters():
                nn.init.normal_(p, std=scale)
