"""CAMoE (arXiv 2109.04290): a video-text model whose video side is a mixture of expert streams,
trained with the Dual Softmax Loss; its video side can be the item encoder's video tower.

How this reads the paper (no code was released; where it is silent, the choice is ours):

* **Inputs.** The paper's streams read CLIP frame features (scene), object-detector region
  features (entity) and frame features through a temporal model (action). Here every stream reads
  the *per-frame features of the item encoder's frozen image tower* (MobileNetV2 by default): the
  project ships no detector, so the entity stream attends over frames instead of regions. The
  text side reads the frozen text tower's token states (MiniLM).
* **Video streams** (each projected to the joint space and L2-normalised):
  ``action``: the frame features plus their frame-to-frame differences, with learned temporal
  positions, through a small transformer encoder (``temporal_layers``), mean-pooled over real
  frames: the one stream that models time, which is what motion needs;
  ``entity``: attention pooling of the frames with a learned query (which frames show the
  object best); ``scene``: the mean of the frames.
* **Text side.** Each stream has its own learned token weights (a linear score per token and
  stream, softmax over the caption's real tokens; no word lists), pooling the token states into
  one text vector per stream, projected like the video streams.
* **Gate.** One gate, computed from the text (the mean token state through a small MLP), gives
  each stream a softmax weight; the similarity of text t and video v is
  ``sum_k gate_k(t) * cos(text_k(t), video_k(v))``, scaled by ``1 / temperature``. The paper
  fuses the streams with a single gate too; that it is computed from the text is our reading of
  "each stream aligned with the matching part of the text": a caption that names only the motion
  should lean on the action stream.
* **Loss.** DSL (``mm_encoder/losses.py``) or InfoNCE on the batch's text x video logits.
* **Inference.** DSL re-ranking of a whole query x gallery logit matrix at T = 1
  (:func:`dsl_rerank`), and R@1/5/10, MdR, MnR for text->video and video->text
  (:func:`retrieval_metrics`).
* **As the item encoder's video tower**, an item's video vector is the concatenation of its three
  stream vectors (the gate needs a query; an item has none), so its width is 3 x ``dim``.

``MeanPool`` is the reference the paper improves on: one stream, the mean of the frames and the
mean of the tokens, projected.

Saved as ``weights.safetensors`` + ``camoe.json`` (config, feature widths, the image tower it was
trained on); nothing is pickled.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mm_encoder.config import VideoTextConfig

FORMAT = "qarm-camoe/1"
STREAMS = ("action", "entity", "scene")


class CAMoEError(ValueError):
    """Nothing to train on (no item with a video and a caption), or a folder that is not a
    saved CAMoE model, or one trained on another image tower."""


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x (B, N, H) over the real positions of mask (B, N)."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class TextStreams(nn.Module):
    """Token states (B, L, H) and their mask → per-stream text vectors (B, S, D), unit norm, the
    gate (B, S) and the per-stream token weights (B, L, S)."""

    def __init__(self, token_dim: int, dim: int, streams: int = len(STREAMS)):
        super().__init__()
        self.norm = nn.LayerNorm(token_dim)
        self.score = nn.Linear(token_dim, streams)
        self.proj = nn.ModuleList(nn.Linear(token_dim, dim) for _ in range(streams))
        self.gate = nn.Sequential(nn.Linear(token_dim, token_dim // 2), nn.GELU(),
                                  nn.Linear(token_dim // 2, streams))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor):
        h = self.norm(tokens)
        scores = self.score(h).masked_fill(~mask.bool().unsqueeze(-1), float("-inf"))
        weights = torch.softmax(scores, dim=1)                               # (B, L, S)
        pooled = torch.einsum("bls,blh->bsh", weights, h)
        text = torch.stack([p(pooled[:, k]) for k, p in enumerate(self.proj)], dim=1)
        gate = torch.softmax(self.gate(_masked_mean(h, mask)), dim=-1)
        return F.normalize(text, dim=-1), gate, weights


class VideoStreams(nn.Module):
    """Per-frame features (B, F, d) and their mask → the action, entity and scene vectors
    (B, 3, D), unit norm."""

    def __init__(self, frame_dim: int, dim: int, frames: int, width: int = 128,
                 temporal_layers: int = 1, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        self.frames = frames
        self.inp = nn.Sequential(nn.LayerNorm(frame_dim), nn.Linear(frame_dim, width))
        self.diff = nn.Sequential(nn.LayerNorm(frame_dim), nn.Linear(frame_dim, width))
        self.pos = nn.Parameter(torch.zeros(frames, width))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout, batch_first=True,
                                           norm_first=True)
        self.temporal = nn.TransformerEncoder(layer, temporal_layers, enable_nested_tensor=False)
        self.query = nn.Parameter(torch.zeros(width))
        self.action = nn.Linear(width, dim)
        self.entity = nn.Linear(width, dim)
        self.scene = nn.Linear(width, dim)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n = frames.shape[1]
        if n > self.frames:
            raise CAMoEError(f"a video has {n} frames; the model reads at most {self.frames}")
        m = mask.bool()
        x = self.inp(frames)                                                 # (B, F, W)
        # Frame-to-frame differences (zero at the first frame and past the last real one).
        d = torch.zeros_like(frames)
        d[:, 1:] = (frames[:, 1:] - frames[:, :-1]) * (m[:, 1:] & m[:, :-1]).unsqueeze(-1)
        a = self.temporal(x + self.diff(d) + self.pos[:n], src_key_padding_mask=~m)
        action = self.action(_masked_mean(a, m))
        att = (x @ self.query / x.shape[-1] ** 0.5).masked_fill(~m, float("-inf"))
        entity = self.entity(torch.einsum("bf,bfw->bw", torch.softmax(att, dim=1), x))
        scene = self.scene(_masked_mean(x, m))
        return F.normalize(torch.stack([action, entity, scene], dim=1), dim=-1)


class CAMoE(nn.Module):
    """Text streams + video streams; ``logits(text, video)`` is the (B_t, B_v) similarity
    matrix divided by the temperature."""

    def __init__(self, cfg: VideoTextConfig, frame_dim: int, token_dim: int, frames: int):
        super().__init__()
        self.cfg = cfg
        self.frame_dim, self.token_dim, self.n_frames = frame_dim, token_dim, frames
        self.text = TextStreams(token_dim, cfg.dim)
        self.video = VideoStreams(frame_dim, cfg.dim, frames, cfg.width, cfg.temporal_layers)

    @property
    def out_dim(self) -> int:
        """Width of an item's video vector (the stream vectors, concatenated)."""
        return len(STREAMS) * self.cfg.dim

    def encode_text(self, tokens, mask):
        return self.text(tokens, mask)

    def encode_video(self, frames, mask) -> torch.Tensor:
        return self.video(frames, mask)

    def similarity(self, text: torch.Tensor, gate: torch.Tensor, video: torch.Tensor
                   ) -> torch.Tensor:
        """sum_k gate[t, k] * <text[t, k], video[v, k]>: (T, V)."""
        return torch.einsum("tk,tkd,vkd->tv", gate, text, video)

    def logits(self, tokens, tmask, frames, fmask) -> torch.Tensor:
        t, g, _ = self.encode_text(tokens, tmask)
        return self.similarity(t, g, self.encode_video(frames, fmask)) / self.cfg.temperature

    def item_vectors(self, frames, fmask) -> torch.Tensor:
        """(B, 3 * dim): the item encoder's video feature."""
        return self.encode_video(frames, fmask).flatten(1)


class MeanPool(nn.Module):
    """The reference: mean of the frames and mean of the tokens, each projected, cosine."""

    def __init__(self, cfg: VideoTextConfig, frame_dim: int, token_dim: int, frames: int):
        super().__init__()
        self.cfg = cfg
        self.frame_dim, self.token_dim, self.n_frames = frame_dim, token_dim, frames
        self.v = nn.Sequential(nn.LayerNorm(frame_dim), nn.Linear(frame_dim, cfg.dim))
        self.t = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, cfg.dim))

    @property
    def out_dim(self) -> int:
        return self.cfg.dim

    def encode_video(self, frames, fmask) -> torch.Tensor:
        return F.normalize(self.v(_masked_mean(frames, fmask)), dim=-1)

    def logits(self, tokens, tmask, frames, fmask) -> torch.Tensor:
        t = F.normalize(self.t(_masked_mean(tokens, tmask)), dim=-1)
        return t @ self.encode_video(frames, fmask).T / self.cfg.temperature

    def item_vectors(self, frames, fmask) -> torch.Tensor:
        return self.encode_video(frames, fmask)


def build_model(cfg: VideoTextConfig, frame_dim: int, token_dim: int, frames: int) -> nn.Module:
    if cfg.model == "camoe":
        return CAMoE(cfg, frame_dim, token_dim, frames)
    if cfg.model == "mean_pool":
        return MeanPool(cfg, frame_dim, token_dim, frames)
    raise CAMoEError(f"pretrain.video.model must be camoe or mean_pool, got {cfg.model!r}")


# --------------------------------------------------------------------------- inference


def dsl_rerank(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """DSL at inference: the query x gallery logit matrix revised by the prior down each
    column, ``S * softmax(S / T, dim=0) * n_queries`` (same shape). A gallery item that many
    queries want is discounted for the queries that want it least."""
    return logits * torch.softmax(logits / temperature, dim=0) * logits.shape[0]


def ranks_of_truth(scores: np.ndarray) -> np.ndarray:
    """1-based rank of the true item (the diagonal) in each row; ties rank pessimistically (an
    item scored equal to the truth counts as above it)."""
    s = np.asarray(scores, np.float64)
    truth = np.diag(s)[:, None]
    return (s >= truth).sum(1)        # the truth itself counts once: its rank is >= 1


def retrieval_metrics(scores: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """R@k (% of queries whose true item is in the top k), MdR and MnR (median and mean rank,
    1-based) of a square query x gallery matrix whose diagonal holds the true pairs."""
    r = ranks_of_truth(scores)
    out = {f"R@{k}": float(100.0 * (r <= k).mean()) for k in ks}
    out.update({"MdR": float(np.median(r)), "MnR": float(r.mean())})
    return out


# --------------------------------------------------------------------------- training


@dataclass
class Pairs:
    """(video, caption) pairs as padded tensors."""
    frames: torch.Tensor          # (N, F, d) per-frame features of the image tower
    frame_mask: torch.Tensor      # (N, F) bool
    tokens: torch.Tensor          # (N, L, H) token states of the text tower
    token_mask: torch.Tensor      # (N, L) bool
    item_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.item_ids)

    def take(self, idx) -> "Pairs":
        idx = torch.as_tensor(np.asarray(idx, np.int64))
        return Pairs(self.frames[idx], self.frame_mask[idx], self.tokens[idx],
                     self.token_mask[idx], self.item_ids[idx.numpy()])


@dataclass
class VideoTextResult:
    model: nn.Module
    cfg: VideoTextConfig
    curve: list[dict]
    #: Held-out metrics: {"t2v": ..., "v2t": ..., "t2v_dsl": ..., "v2t_dsl": ...}.
    metrics: dict[str, dict[str, float]]
    n_train: int
    n_holdout: int
    image_tower: str = ""
    extra: dict = field(default_factory=dict)


def loss_of(cfg: VideoTextConfig, logits: torch.Tensor) -> torch.Tensor:
    from mm_encoder.losses import dual_softmax_loss, info_nce

    if cfg.loss == "dsl":
        return dual_softmax_loss(logits, cfg.dsl_temperature)
    return info_nce(logits)


@torch.no_grad()
def score_matrix(model: nn.Module, p: Pairs, batch: int = 512) -> torch.Tensor:
    """Text x video logits of all pairs (queries: captions; gallery: videos)."""
    model.eval()
    if isinstance(model, CAMoE):
        t, g = [], []
        v = torch.cat([model.encode_video(p.frames[i:i + batch], p.frame_mask[i:i + batch])
                       for i in range(0, len(p), batch)])
        for i in range(0, len(p), batch):
            ti, gi, _ = model.encode_text(p.tokens[i:i + batch], p.token_mask[i:i + batch])
            t.append(ti), g.append(gi)
        return model.similarity(torch.cat(t), torch.cat(g), v) / model.cfg.temperature
    return model.logits(p.tokens, p.token_mask, p.frames, p.frame_mask)


def evaluate_pairs(model: nn.Module, p: Pairs) -> dict[str, dict[str, float]]:
    """R@1/5/10, MdR, MnR of held-out pairs, text→video and video→text, with and without DSL
    re-ranking (T = 1) of the whole matrix."""
    s = score_matrix(model, p)
    return {"t2v": retrieval_metrics(s.numpy()), "v2t": retrieval_metrics(s.T.numpy()),
            "t2v_dsl": retrieval_metrics(dsl_rerank(s).numpy()),
            "v2t_dsl": retrieval_metrics(dsl_rerank(s.T).numpy())}


def train_video_text(pairs: Pairs, cfg: VideoTextConfig, hold: np.ndarray,
                     progress: Optional[Callable[[dict], None]] = None) -> VideoTextResult:
    """Train on the pairs outside ``hold`` (a boolean mask), judge on the held-out ones."""
    if len(pairs) < 4:
        raise CAMoEError(f"{len(pairs)} (video, caption) pairs: too few to train on")
    tr_idx, ho_idx = np.flatnonzero(~hold), np.flatnonzero(hold)
    if len(tr_idx) < 2 or len(ho_idx) < 2:
        raise CAMoEError(f"{len(tr_idx)} training and {len(ho_idx)} held-out pairs: both "
                         "parts need at least 2 (pretrain.video.holdout)")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    train, held = pairs.take(tr_idx), pairs.take(ho_idx)
    model = build_model(cfg, pairs.frames.shape[2], pairs.tokens.shape[2], pairs.frames.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=True)
    steps = cfg.epochs * max(1, -(-len(train) // cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps, pct_start=0.1)
    curve = []
    for epoch in range(cfg.epochs):
        model.train()
        order = rng.permutation(len(train))
        total, n = 0.0, 0
        for s in range(0, len(order), cfg.batch_size):
            idx = torch.as_tensor(order[s:s + cfg.batch_size])
            if len(idx) < 2:
                continue
            logits = model.logits(train.tokens[idx], train.token_mask[idx],
                                  train.frames[idx], train.frame_mask[idx])
            loss = loss_of(cfg, logits)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            n += len(idx)
        point = {"epoch": epoch + 1, "loss": total / max(n, 1)}
        if epoch == cfg.epochs - 1 or (epoch + 1) % 10 == 0:
            point["holdout_t2v_R@1"] = evaluate_pairs(model, held)["t2v"]["R@1"]
        curve.append(point)
        if progress:
            progress(point)
    return VideoTextResult(model.eval(), cfg, curve, evaluate_pairs(model, held), len(tr_idx),
                           len(ho_idx))


# --------------------------------------------------------------------------- features


def token_states(text_tower, captions: Sequence[str], max_length: int = 32, batch: int = 128
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen text tower's last hidden states (N, L, H) and attention masks (N, L)."""
    states, masks = [], []
    tok, model = text_tower.tokenizer, text_tower.model
    with torch.no_grad():
        for i in range(0, len(captions), batch):
            enc = tok(list(captions[i:i + batch]), padding="max_length", truncation=True,
                      max_length=max_length, return_tensors="pt")
            states.append(model(**enc).last_hidden_state.float())
            masks.append(enc["attention_mask"].bool())
    return torch.cat(states), torch.cat(masks)


def frame_features(image_tower, videos: Sequence[np.ndarray], max_frames: int,
                   batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame features (N, max_frames, d) of decoded videos (each (F, H, W, 3) uint8) through
    the frozen image tower, zero-padded, and their masks; longer videos keep ``max_frames``
    frames evenly spaced."""
    from mm_encoder.towers import to_tensor

    picked = [v[frame_index(len(v), max_frames)] for v in videos]
    flat = [f for v in picked for f in v]
    with torch.no_grad():
        feats = torch.cat([image_tower.forward_tensor(to_tensor(flat[i:i + batch])).float()
                           for i in range(0, len(flat), batch)]) if flat else torch.zeros(0, 1)
    return pad_frames(list(feats.split([len(v) for v in picked])), max_frames)


def decode_videos(ids, texts, videos, size: int):
    """(ids, texts, decoded videos (F, size, size, 3)) of the items that have a video and a
    text; a video that does not decode is left out (ingest validated them)."""
    from mm_encoder.towers import decode_rgb

    out_ids, out_texts, out_videos = [], [], []
    for i, t, v in zip(ids, texts, videos):
        if v is None or len(v) == 0 or not t:
            continue
        try:
            frames = np.stack([decode_rgb(f, size) for f in v])
        except Exception:                  # noqa: BLE001 - ingest validated; skip, never fail
            continue
        out_ids.append(i), out_texts.append(t), out_videos.append(frames)
    return out_ids, out_texts, out_videos


def frame_index(n: int, max_frames: int) -> np.ndarray:
    """The frames a video of ``n`` frames contributes: all, or ``max_frames`` evenly spaced."""
    if n <= max_frames:
        return np.arange(n)
    return np.linspace(0, n - 1, max_frames).round().astype(int)


def pad_frames(per_video: Sequence[torch.Tensor], max_frames: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-video frame features (each (F_i, d)) → zero-padded (N, max_frames, d) and masks;
    longer videos keep ``max_frames`` frames evenly spaced."""
    d = per_video[0].shape[1] if len(per_video) else 1
    out = torch.zeros(len(per_video), max_frames, d)
    mask = torch.zeros(len(per_video), max_frames, dtype=torch.bool)
    for i, f in enumerate(per_video):
        f = f[torch.as_tensor(frame_index(len(f), max_frames))]
        out[i, :len(f)] = f
        mask[i, :len(f)] = True
    return out, mask


# --------------------------------------------------------------------------- artifact


def save_video_text(res: VideoTextResult, folder: Path) -> Path:
    from mm_encoder.saved import save_folder

    m = res.model
    return save_folder(folder, m.state_dict(), "camoe.json", FORMAT, {
        "config": asdict(res.cfg), "frame_dim": m.frame_dim, "token_dim": m.token_dim,
        "frames": m.n_frames, "image_tower": res.image_tower, "metrics": res.metrics,
        "n_train": res.n_train, "n_holdout": res.n_holdout})


def load_video_text(folder: str | Path) -> tuple[nn.Module, dict]:
    """(model in eval mode, its camoe.json) of a saved model; never unpickles."""
    from mm_encoder.saved import load_folder

    meta, state = load_folder(folder, "camoe.json", FORMAT, CAMoEError, "video-text model")
    cfg = VideoTextConfig(**meta["config"])
    model = build_model(cfg, meta["frame_dim"], meta["token_dim"], meta["frames"])
    model.load_state_dict(state)
    return model.eval(), meta
