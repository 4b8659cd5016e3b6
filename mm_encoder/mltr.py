"""MlTr: Multi-label Classification with Transformer (Cheng et al., arXiv 2106.06195), as read
here, with a multi-label head and the multi-label metrics.

No code was released; the paper describes a hierarchical transformer built from **window
partitioning**, **pixel attention inside a window** and **cross-window attention**, from the same
group as CAT. How this module reads it:

    image (B, 3, H, W)
      └ patch embedding: conv s x s stride s → C channels, LayerNorm, + absolute position embedding
      └ stages at 1/s, 1/2s, 1/4s, 1/8s resolution, widths C, 2C, 4C, 8C
          each stage: depth units of two pre-norm blocks, each with its own MLP:
              pixel attention in windows  →  cross-window attention
          between stages: 2x2 patch merging (concat 4C → LayerNorm → linear 2C, no bias)
      └ multi-label head: LayerNorm → mean over tokens → linear to one logit per label

* **Taken from CAT** (``mm_encoder/cat.py``): the patch embedding, patch merging, pre-norm blocks
  with their MLPs, and *pixel attention inside a window*, which is CAT's IPSA (multi-head
  attention among the w x w pixels of each window with a learned relative position bias).
* **MlTr's own component: cross-window attention** (:class:`CrossWindowAttention`). Every window
  is summarised by the mean of its pixels; the window summaries attend to each other with
  multi-head attention (learned absolute position embedding of the window grid, so the attention
  knows where each window is); each window's output is added to every pixel of that window.
  This is how information crosses window borders, where CAT instead attends across patches one
  channel at a time (CPSA) and Swin shifts the windows. The paper does not say how a window is
  summarised nor how the result returns to the pixels; mean pooling and broadcasting are the
  simplest choices that keep the cost linear in the number of pixels.

Sizes: :func:`mltr_s` is the paper's MlTr-s scale (C=96, depth units [2,2,4,1], heads
[3,6,12,24], 7x7 windows at 224 px: 32.6M parameters and 5.5G multiply-adds, against the paper's
33M; a depth unit holds two blocks, so this is Swin-T's 12 blocks plus two); :func:`mltr_micro` is a small variant
trained on CPU in minutes. ``flops()`` counts multiply-adds analytically, as ``CAT.flops`` does.

The metrics (:func:`multilabel_metrics`) follow the multi-label literature: mAP is the mean over
labels with at least one positive of the average precision over the whole test set; CP, CR, CF1
average precision and recall per label (a label never predicted has precision 0) at a threshold
of 0.5; OP, OR, OF1 pool every (image, label) decision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mm_encoder.cat import (Block, HierarchicalBackbone, InnerPatchAttention, check_stages,
                            from_patches, stage_resolutions, to_patches)


@dataclass
class MlTrConfig:
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 80
    embed_dim: int = 96                                  # C
    depths: tuple[int, ...] = (2, 2, 4, 1)               # depth units per stage
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window: int = 7                                      # w: window side
    stem_stride: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path: float = 0.1

    def stage_resolutions(self) -> list[int]:
        return stage_resolutions(self.img_size, self.stem_stride, len(self.depths))

    def stage_windows(self) -> list[int]:
        return [min(self.window, r) for r in self.stage_resolutions()]

    def validate(self) -> None:
        check_stages(self.img_size, self.stem_stride, self.stage_resolutions(),
                     self.stage_windows(), "windows")


class CrossWindowAttention(nn.Module):
    """Attention among windows: each window's mean pixel (plus a learned embedding of its place
    in the window grid) is a token; multi-head self-attention among the tokens; each window's
    output is added to all of its pixels."""

    def __init__(self, dim: int, heads: int, window: int, grid: int, qkv_bias: bool = True):
        super().__init__()
        self.dim, self.heads, self.window = dim, heads, window
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.pos = nn.Parameter(torch.zeros(grid * grid, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) → (B, H, W, C)"""
        B, H, W, C = x.shape
        w = self.window
        n = (H // w) * (W // w)
        tokens = to_patches(x, w).mean(1).view(B, n, C) + self.pos[:n]          # (B, n, C)
        qkv = self.qkv(tokens).view(B, n, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                                        # (B, h, n, d)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
        out = self.proj((attn @ v).transpose(1, 2).reshape(B, n, C))            # (B, n, C)
        per_pixel = out.reshape(B * n, 1, C).expand(B * n, w * w, C)
        return from_patches(per_pixel, w, B, H, W)


class MlTr(HierarchicalBackbone):
    def __init__(self, cfg: MlTrConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        C = cfg.embed_dim
        self._stem(cfg, pos=True)
        rates = torch.linspace(0, cfg.drop_path, 2 * sum(cfg.depths)).tolist()
        k = 0
        for i, (units, heads, w, r) in enumerate(zip(cfg.depths, cfg.num_heads,
                                                     cfg.stage_windows(),
                                                     cfg.stage_resolutions())):
            dim = C * 2 ** i
            blocks = []
            for _ in range(units):
                blocks.append(Block(dim, InnerPatchAttention(dim, heads, w, cfg.qkv_bias),
                                    cfg.mlp_ratio, rates[k]))
                blocks.append(Block(dim, CrossWindowAttention(dim, heads, w, r // w,
                                                              cfg.qkv_bias),
                                    cfg.mlp_ratio, rates[k + 1]))
                k += 2
            self._add_stage(blocks, dim, last=i == len(cfg.depths) - 1)
        self._finish(cfg)

    def flops(self) -> int:
        """Analytic multiply-adds of one forward pass: linear layers, convolutions and attention
        matmuls (norms, softmax, activations and pooling are not counted)."""
        cfg = self.cfg
        C, s = cfg.embed_dim, cfg.stem_stride
        res = cfg.stage_resolutions()
        total = res[0] ** 2 * C * cfg.in_chans * s * s
        for i, (units, w) in enumerate(zip(cfg.depths, cfg.stage_windows())):
            d, n = C * 2 ** i, res[i] ** 2
            windows = n // (w * w)
            mlp = 2 * n * d * int(d * cfg.mlp_ratio)
            pixel = 4 * n * d * d + 2 * n * (w * w) * d + mlp
            cross = 4 * windows * d * d + 2 * windows * windows * d + mlp
            total += units * (pixel + cross)
            if i < len(cfg.depths) - 1:
                total += (n // 4) * 4 * d * 2 * d
        if cfg.num_classes:
            total += self.num_features * cfg.num_classes
        return int(total)


def mltr_s(num_classes: int = 80, **kw) -> MlTr:
    """MlTr-s at 224 px: C=96, depth units [2,2,4,1], heads [3,6,12,24], 7x7 windows: 32.6M
    parameters (paper: 33M)."""
    return MlTr(MlTrConfig(num_classes=num_classes, **kw))


def mltr_micro(num_classes: int, img_size: int = 32, **kw) -> MlTr:
    """A small MlTr for small images and CPU training: stem stride 2, 4x4 windows, C=32, one
    depth unit in each of three stages."""
    return MlTr(MlTrConfig(img_size=img_size, num_classes=num_classes, embed_dim=32,
                           depths=(1, 1, 1), num_heads=(1, 2, 4), window=4, stem_stride=2,
                           drop_path=0.0, **kw))


# ----------------------------------------------------------------------------- metrics


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """AP of one label over a test set: the mean of precision@rank at each positive's rank (ties
    broken by the order given); NaN when the label has no positive."""
    labels = np.asarray(labels).astype(bool)
    if not labels.any():
        return float("nan")
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    hits = labels[order]
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision_at[hits].mean())


def multilabel_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float = 0.5
                       ) -> dict[str, float]:
    """mAP, CP, CR, CF1, OP, OR, OF1 of probabilities ``scores`` [N, K] against 0/1 ``labels``.

    mAP averages only labels with a positive. Per-label precision of a label never predicted is
    0, recall of a label with no positive is left out of CR (and its precision of CP, as in the
    literature's evaluation code, which averages over the labels present)."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    aps = [average_precision(s[:, k], y[:, k]) for k in range(y.shape[1])]
    present = y.any(0)
    pred = s >= threshold
    tp = (pred & y).sum(0).astype(np.float64)
    n_pred, n_pos = pred.sum(0).astype(np.float64), y.sum(0).astype(np.float64)
    cp = np.where(n_pred > 0, tp / np.maximum(n_pred, 1), 0.0)[present].mean() if present.any() \
        else float("nan")
    cr = (tp / np.maximum(n_pos, 1))[present].mean() if present.any() else float("nan")
    op = tp.sum() / pred.sum() if pred.sum() else 0.0
    orr = tp.sum() / y.sum() if y.sum() else float("nan")

    def f1(p, r):
        return 2 * p * r / (p + r) if p + r > 0 else 0.0

    return {"mAP": float(np.nanmean(aps)) if present.any() else float("nan"),
            "CP": float(cp), "CR": float(cr), "CF1": float(f1(cp, cr)),
            "OP": float(op), "OR": float(orr), "OF1": float(f1(op, orr))}
