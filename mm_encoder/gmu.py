"""GMU: generation-guided multi-level unified video grounding (find the moment a query
describes), and its metrics.

No code was released and only the abstract could be checked, so this is how I read it:

* **Encoders.** Frames: the frozen image tower's per-frame features plus frame-to-frame
  differences (motion), projected, with learned positions, through a small transformer encoder
  (``layers``). Query: the frozen text tower's token states, projected; a learned attention pool
  gives one query vector. Fusion: each step attends over the query's tokens and is gated by the
  query vector (``F``: one fused feature per step).
* **Moment level.** Per step, the logits of being the start and the end boundary (softmax over
  the video's steps).
* **Clip level.** Proposals over several window lengths (``windows``, shares of the video; every
  start): a proposal's feature is the mean of ``F`` over it with its two boundary steps, scored
  by an MLP against the IoU-scaled target (2D-TAN style: 0 below IoU 0.3, rising to 1).
* **Generator.** A multi-modal generator (a transformer decoder with three learned queries over
  the fused steps and the query tokens) produces an *implicit* start feature, end feature and
  clip feature. They are trained to reconstruct the true moment's boundary features and its
  mean feature (cosine, on stopped gradients: generation as a guide, not a shortcut).
* **Discriminator.** The generated features are the queries of a cross-attention scorer: the
  start (end) feature's scaled dot product with every step adds to that step's start (end)
  logit, and the clip feature's with every proposal's feature adds to the proposal's score.
* **Both levels at inference.** A proposal's score is ``log p_start(s) + log p_end(e) +
  clip_weight * log sigmoid(clip score)`` (only the parts that are on); top-K after
  non-maximum suppression at IoU 0.5.

Spans are in shares of the video's duration: step ``t`` of ``T`` covers ``[t/T, (t+1)/T]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mm_encoder.config import GroundingConfig


class GroundingError(ValueError):
    """Grounding data or settings that cannot work (both levels off, empty set...)."""


# --------------------------------------------------------------------------- metrics


def temporal_iou(a, b) -> np.ndarray:
    """IoU of spans ``a`` and ``b`` (arrays of shape (..., 2): start, end); identical spans
    (also of zero length) have IoU 1."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    inter = np.clip(np.minimum(a[..., 1], b[..., 1]) - np.maximum(a[..., 0], b[..., 0]), 0,
                    None)
    union = np.maximum(a[..., 1], b[..., 1]) - np.minimum(a[..., 0], b[..., 0])
    same = (a == b).all(-1)
    return np.where(same, 1.0, inter / np.where(union > 0, union, 1.0))


def grounding_metrics(pred: np.ndarray, truth: np.ndarray,
                      ious: Sequence[float] = (0.3, 0.5, 0.7), ks: Sequence[int] = (1, 5)
                      ) -> dict[str, float]:
    """``pred`` (N, K, 2) ranked spans per query, ``truth`` (N, 2): R@k@IoU (percent) and mIoU
    (mean top-1 IoU, percent)."""
    pred = np.asarray(pred, float)
    if pred.ndim == 2:
        pred = pred[:, None]
    iou = temporal_iou(pred, np.asarray(truth, float)[:, None, :])
    out = {}
    for k in ks:
        for m in ious:
            out[f"R@{k}@{m}"] = 100.0 * float((iou[:, :k] >= m).any(1).mean())
    out["mIoU"] = 100.0 * float(iou[:, 0].mean())
    return out


def trivial_spans(train_truth: np.ndarray, n: int) -> np.ndarray:
    """The baseline: the average-length span at the average centre of the training spans."""
    t = np.asarray(train_truth, float)
    length, centre = (t[:, 1] - t[:, 0]).mean(), t.mean(1).mean()
    s = np.clip(centre - length / 2, 0, 1 - length)
    return np.tile([[s, s + length]], (n, 1))


# --------------------------------------------------------------------------- proposals


def proposals(steps: int, windows: Sequence[float]) -> np.ndarray:
    """Clip-level proposals (P, 2) of integer steps [s, e] (inclusive): every start, lengths
    ``round(w * steps)`` (at least 1) for each window share."""
    lengths = sorted({max(1, min(steps, int(round(w * steps)))) for w in windows})
    out = [(s, s + n - 1) for n in lengths for s in range(0, steps - n + 1)]
    return np.asarray(out, np.int64)


def steps_to_span(p: np.ndarray, steps) -> np.ndarray:
    """Integer [s, e] steps → shares of the video ``[s/T, (e+1)/T]`` (``steps``: T, broadcast
    against ``p[..., 0]``)."""
    t = np.asarray(steps, float)
    return np.stack([p[..., 0] / t, (p[..., 1] + 1) / t], -1)


# --------------------------------------------------------------------------- model


def _masked_softmax_logits(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(~mask, -1e4)


class GMU(nn.Module):
    def __init__(self, cfg: GroundingConfig, frame_dim: int, token_dim: int):
        super().__init__()
        if not (cfg.moment or cfg.clip):
            raise GroundingError("GMU needs the moment level or the clip level (or both)")
        self.cfg, d = cfg, cfg.dim
        self.frame = nn.Sequential(nn.LayerNorm(frame_dim), nn.Linear(frame_dim, d))
        self.diff = nn.Sequential(nn.LayerNorm(frame_dim), nn.Linear(frame_dim, d))
        self.pos = nn.Parameter(torch.zeros(cfg.max_frames, d))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(d, cfg.heads, 2 * d, dropout=0.1, batch_first=True,
                                           norm_first=True)
        self.temporal = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.token = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, d))
        self.pool = nn.Linear(d, 1)
        self.cross = nn.MultiheadAttention(d, cfg.heads, batch_first=True)
        self.gate = nn.Linear(d, d)
        self.fuse = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        if cfg.moment:
            self.boundary = nn.Linear(d, 2)
        if cfg.clip:
            self.clip_head = nn.Sequential(nn.Linear(3 * d, d), nn.GELU(), nn.Linear(d, 1))
        if cfg.generator:
            self.gen_queries = nn.Parameter(torch.randn(3, d) * 0.02)
            dec = nn.TransformerDecoderLayer(d, cfg.heads, 2 * d, dropout=0.1, batch_first=True,
                                             norm_first=True)
            self.generator = nn.TransformerDecoder(dec, 1)
            self.disc = nn.ModuleList([nn.Linear(d, d) for _ in range(3)])
            self.clip_proj = nn.Linear(3 * d, d)
        self.props = torch.from_numpy(proposals(cfg.max_frames, cfg.windows))

    def fused(self, frames, fmask, tokens, tmask):
        diff = torch.cat([torch.zeros_like(frames[:, :1]), frames[:, 1:] - frames[:, :-1]], 1)
        diff = diff * fmask[..., None]
        h = self.frame(frames) + self.diff(diff) + self.pos[: frames.shape[1]]
        h = self.temporal(h, src_key_padding_mask=~fmask)
        t = self.token(tokens)
        w = self.pool(t).squeeze(-1).masked_fill(~tmask, -1e4).softmax(-1)
        q = (w[..., None] * t).sum(1)
        a, _ = self.cross(h, t, t, key_padding_mask=~tmask)
        f = (h + a) * torch.sigmoid(self.gate(q))[:, None]
        f = f + self.fuse(f)
        return f * fmask[..., None], t, tmask

    def clip_features(self, f: torch.Tensor) -> torch.Tensor:
        """(B, P, 3d): mean over each proposal, its start and its end step."""
        c = torch.cumsum(torch.cat([torch.zeros_like(f[:, :1]), f], 1), 1)
        s, e = self.props[:, 0], self.props[:, 1]
        mean = (c[:, e + 1] - c[:, s]) / (e - s + 1).float()[None, :, None]
        return torch.cat([mean, f[:, s], f[:, e]], -1)

    def forward(self, frames, fmask, tokens, tmask) -> dict:
        f, t, tmask = self.fused(frames, fmask, tokens, tmask)
        out = {"fused": f}
        starts = ends = None
        if self.cfg.moment:
            b = self.boundary(f)
            starts, ends = b[..., 0], b[..., 1]
        cf = self.clip_features(f) if (self.cfg.clip or self.cfg.generator) else None
        clip = self.clip_head(cf).squeeze(-1) if self.cfg.clip else None
        if self.cfg.generator:
            mem = torch.cat([f, t], 1)
            mem_mask = torch.cat([fmask, tmask], 1)
            g = self.generator(self.gen_queries.expand(f.shape[0], -1, -1), mem,
                               memory_key_padding_mask=~mem_mask)
            out["generated"] = g
            scale = 1.0 / math.sqrt(f.shape[-1])
            gs = torch.einsum("bd,btd->bt", self.disc[0](g[:, 0]), f) * scale
            ge = torch.einsum("bd,btd->bt", self.disc[1](g[:, 1]), f) * scale
            gc = torch.einsum("bd,bpd->bp", self.disc[2](g[:, 2]), self.clip_proj(cf)) * scale
            starts = gs if starts is None else starts + gs
            ends = ge if ends is None else ends + ge
            clip = gc if clip is None else clip + gc
        if starts is not None:
            out["start"] = _masked_softmax_logits(starts, fmask)
            out["end"] = _masked_softmax_logits(ends, fmask)
        if clip is not None:
            valid = fmask[:, self.props[:, 1]]
            out["clip"] = clip.masked_fill(~valid, -1e4)
        return out

    def proposal_scores(self, out: dict) -> torch.Tensor:
        """(B, P): the combined score of every proposal (the levels that are on)."""
        s, e = self.props[:, 0], self.props[:, 1]
        score = 0.0
        if "start" in out:
            score = out["start"].log_softmax(-1)[:, s] + out["end"].log_softmax(-1)[:, e]
        if "clip" in out:
            score = score + self.cfg.clip_weight * F.logsigmoid(out["clip"])
        return score


# --------------------------------------------------------------------------- data and training


@dataclass
class GroundingSet:
    """Queries over videos: each video's per-step features (padded) once, each query's token
    states, video index and true span."""
    frames: torch.Tensor          # (V, T, d) per video
    fmask: torch.Tensor           # (V, T)
    tokens: torch.Tensor          # (N, L, h) per query
    tmask: torch.Tensor           # (N, L)
    spans: np.ndarray             # (N, 2) shares of the video
    video: np.ndarray             # (N,) index into frames
    queries: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.spans)

    def take(self, idx) -> "GroundingSet":
        idx = np.asarray(idx, np.int64)
        t = torch.from_numpy(idx)
        return GroundingSet(self.frames, self.fmask, self.tokens[t], self.tmask[t],
                            self.spans[idx], self.video[idx],
                            [self.queries[i] for i in idx] if self.queries else [])

    def batch(self, idx) -> tuple[torch.Tensor, ...]:
        """(frames, fmask, tokens, tmask) of the queries ``idx``."""
        idx = np.asarray(idx, np.int64)
        v, t = torch.from_numpy(self.video[idx]), torch.from_numpy(idx)
        return self.frames[v], self.fmask[v], self.tokens[t], self.tmask[t]

    def steps(self) -> np.ndarray:
        """Real steps of each query's video."""
        return self.fmask.sum(1).numpy()[self.video]


def _targets(spans: np.ndarray, steps: np.ndarray, T: int, props: np.ndarray):
    """Start/end step indices and the clip level's IoU-scaled targets."""
    s = np.clip(np.floor(spans[:, 0] * steps + 1e-6), 0, steps - 1).astype(np.int64)
    e = np.clip(np.ceil(spans[:, 1] * steps - 1e-6) - 1, 0, steps - 1).astype(np.int64)
    e = np.maximum(e, s)
    pspans = steps_to_span(props[None], steps[:, None].repeat(len(props), 1))
    iou = temporal_iou(pspans, spans[:, None])
    scaled = np.clip((iou - 0.3) / 0.7, 0, 1)
    return s, e, scaled


def _smooth(idx: torch.Tensor, mask: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    t = torch.arange(mask.shape[1])[None].float()
    p = torch.exp(-0.5 * ((t - idx[:, None].float()) / sigma) ** 2) * mask
    return p / p.sum(1, keepdim=True)


def loss_of(model: GMU, out: dict, s, e, scaled, fmask) -> torch.Tensor:
    loss = 0.0
    if "start" in out:
        loss = loss - (_smooth(s, fmask) * out["start"].log_softmax(-1)).sum(1).mean()
        loss = loss - (_smooth(e, fmask) * out["end"].log_softmax(-1)).sum(1).mean()
    if "clip" in out:
        valid = fmask[:, model.props[:, 1]]
        bce = F.binary_cross_entropy_with_logits(out["clip"], scaled, reduction="none")
        loss = loss + (bce * valid).sum() / valid.sum()
    if "generated" in out:
        f = out["fused"].detach()
        g = out["generated"]
        b = torch.arange(len(s))
        c = torch.cumsum(torch.cat([torch.zeros_like(f[:, :1]), f], 1), 1)
        mean = (c[b, e + 1] - c[b, s]) / (e - s + 1).float()[:, None]
        for k, target in enumerate((f[b, s], f[b, e], mean)):
            loss = loss + (1 - F.cosine_similarity(g[:, k], target, dim=-1)).mean()
    return loss


@torch.no_grad()
def predict(model: GMU, data: GroundingSet, top: int = 5, batch: int = 256,
            nms: float = 0.5, scores_too: bool = False):
    """(N, top, 2) ranked spans (shares of each video) per query (and (N, top) scores)."""
    model.eval()
    props = model.props.numpy()
    out = np.zeros((len(data), top, 2))
    out_scores = np.zeros((len(data), top))
    all_steps = data.steps()
    for a in range(0, len(data), batch):
        idx = np.arange(a, min(a + batch, len(data)))
        scores = model.proposal_scores(model(*data.batch(idx)))
        steps = all_steps[idx]
        for i, sc in enumerate(scores.numpy()):
            ok = props[:, 1] < steps[i]
            cand, sc = props[ok], sc[ok]
            spans = steps_to_span(cand, steps[i])
            order = np.argsort(-sc, kind="stable")
            kept: list[np.ndarray] = []
            kept_scores: list[float] = []
            for j in order:
                if all(temporal_iou(spans[j], k) < nms for k in kept):
                    kept.append(spans[j])
                    kept_scores.append(float(sc[j]))
                if len(kept) == top:
                    break
            while len(kept) < top:
                kept.append(kept[-1])
                kept_scores.append(kept_scores[-1])
            out[a + i] = np.stack(kept)
            out_scores[a + i] = kept_scores
    return (out, out_scores) if scores_too else out


@dataclass
class GroundingResult:
    model: GMU
    metrics: dict
    trivial: dict
    losses: list
    held_out: int
    trained_on: int


def split_by_video(data: GroundingSet, holdout: float, seed: int):
    """Held-out queries: those of a ``holdout`` share of the videos (never the same video in
    both parts)."""
    videos = np.unique(data.video)
    rng = np.random.default_rng([seed, 7])
    held = set(rng.choice(videos, max(1, int(round(holdout * len(videos)))), replace=False)
               .tolist())
    hold = np.asarray([v in held for v in data.video])
    return np.flatnonzero(~hold), np.flatnonzero(hold)


def train_gmu(data: GroundingSet, cfg: GroundingConfig, train_idx=None, test_idx=None,
              progress: bool = False) -> GroundingResult:
    """Train on ``train_idx`` (default: the videos not held out), report R@K / mIoU on
    ``test_idx`` and the trivial baseline beside it."""
    if len(data) == 0:
        raise GroundingError("no grounding queries to train on")
    if train_idx is None:
        train_idx, test_idx = split_by_video(data, cfg.holdout, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = GMU(cfg, data.frames.shape[-1], data.tokens.shape[-1])
    if data.frames.shape[1] != cfg.max_frames:
        raise GroundingError(f"the set has {data.frames.shape[1]} steps per video, the model "
                             f"{cfg.max_frames} (ground.max_frames)")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=True)
    tr = data.take(train_idx)
    steps = tr.steps()
    s, e, scaled = _targets(tr.spans, steps, cfg.max_frames, model.props.numpy())
    s, e, scaled = torch.from_numpy(s), torch.from_numpy(e), torch.from_numpy(scaled).float()
    rng = np.random.default_rng(cfg.seed)
    total = cfg.epochs * max(1, math.ceil(len(tr) / cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=total, pct_start=0.1)
    losses = []
    from tqdm.auto import tqdm

    for _ in tqdm(range(cfg.epochs), desc="ground: train GMU", unit="epoch",
                  disable=None if progress else True):
        model.train()
        order = rng.permutation(len(tr))
        run = 0.0
        for a in range(0, len(tr), cfg.batch_size):
            bi = order[a:a + cfg.batch_size]
            b = torch.from_numpy(bi)
            frames, fmask, tokens, tmask = tr.batch(bi)
            out = model(frames, fmask, tokens, tmask)
            loss = loss_of(model, out, s[b], e[b], scaled[b], fmask)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            run += float(loss.detach()) * len(b)
        losses.append(run / len(tr))
    te = data.take(test_idx)
    metrics = grounding_metrics(predict(model, te), te.spans) if len(te) else {}
    trivial = grounding_metrics(trivial_spans(tr.spans, len(te)), te.spans) if len(te) else {}
    return GroundingResult(model.eval(), metrics, trivial, losses, len(te), len(tr))


def save_gmu(model: GMU, folder, **extra):
    """``weights.safetensors`` + ``gmu.json`` (config, input widths, ``extra`` facts)."""
    from dataclasses import asdict

    from mm_encoder.saved import save_folder

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_folder(folder, state, "gmu.json", "qarm-gmu/1",
                       {"config": asdict(model.cfg), "frame_dim": model.frame[1].in_features,
                        "token_dim": model.token[1].in_features, **extra})


def load_gmu(folder) -> tuple[GMU, dict]:
    """(model in eval mode, its facts) of a folder :func:`save_gmu` wrote; never unpickles."""
    from mm_encoder.saved import load_folder

    meta, state = load_folder(folder, "gmu.json", "qarm-gmu/1", GroundingError, "GMU model")
    model = GMU(GroundingConfig(**meta["config"]), meta["frame_dim"], meta["token_dim"])
    model.load_state_dict(state)
    return model.eval(), meta
