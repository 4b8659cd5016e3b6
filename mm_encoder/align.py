"""Alignment: train the item encoder's fusion/projection so that items people engage with
together are near each other (curing representation unmatching).

Training reads the frozen tower features of every item (kept by the embed stage), so the towers
are not run again. Each step takes a batch of behaviour pairs (src, dst) and minimises an
in-batch contrastive loss between their embeddings (InfoNCE, or DSL), plus a content term that
keeps every aligned embedding near the item's raw (pre-alignment) embedding, so content
understanding is not forgotten: ``loss = contrastive + content_weight * mean(1 - cos(z, z_raw))``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mm_encoder.config import AlignConfig
from mm_encoder.item_encoder import (FusionHead, ItemEncoder, TowerFeatures, item_text,
                                     unpack_features)
from mm_encoder.losses import dual_softmax_loss, info_nce

log = logging.getLogger(__name__)


def _subset(f: TowerFeatures, idx: torch.Tensor) -> TowerFeatures:
    return TowerFeatures({m: v[idx] for m, v in f.features.items()},
                         {m: v[idx] for m, v in f.masks.items()})


def train_alignment(fusion: FusionHead, features: TowerFeatures, src: np.ndarray,
                    dst: np.ndarray, cfg: AlignConfig, progress: bool = True,
                    text_tower=None, texts=None) -> tuple[FusionHead, list[dict]]:
    """Train a copy of ``fusion`` on pairs of row indices into ``features``.

    With ``cfg.tune_text_layers > 0``, ``text_tower`` (a TextTower, tuned in place) recomputes the
    text features of each batch from ``texts`` (one string per feature row) with its last layers
    trainable. Returns the trained fusion copy and the per-epoch history (loss parts)."""
    if len(src) == 0:
        raise ValueError("no behaviour pairs to align on: check the pairs stage's output")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    raw = fusion.eval()
    with torch.no_grad():
        z_raw = raw(features)                                         # (N, D), the anchor
    model = copy.deepcopy(fusion).train()
    groups = [{"params": list(model.parameters()), "lr": cfg.lr}]
    tune = cfg.tune_text_layers > 0
    if tune:
        if text_tower is None or texts is None:
            raise ValueError("align.tune_text_layers needs the text tower and the item texts")
        tuned = text_tower.last_layers(cfg.tune_text_layers)
        for p in text_tower.model.parameters():
            p.requires_grad_(False)
        for p in tuned.values():
            p.requires_grad_(True)
        groups.append({"params": list(tuned.values()), "lr": cfg.text_lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=True)

    def batch_features(rows: torch.Tensor) -> TowerFeatures:
        f = _subset(features, rows)
        if tune:
            f.features["text"] = text_tower.forward_grad([texts[k] for k in rows.tolist()])
        return f

    src_t, dst_t = torch.from_numpy(src.astype(np.int64)), torch.from_numpy(dst.astype(np.int64))
    n = len(src)
    steps = max(1, n // cfg.batch_size)
    history = []
    bar = tqdm(total=cfg.epochs * steps, desc="align", unit="step", disable=not progress)
    for epoch in range(cfg.epochs):
        order = torch.from_numpy(rng.permutation(n))
        sums = {"contrastive": 0.0, "content": 0.0}
        for s in range(steps):
            b = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            i, j = src_t[b], dst_t[b]
            zi, zj = model(batch_features(i)), model(batch_features(j))
            logits = zi @ zj.T / cfg.temperature
            # Two pairs in one batch may share an item: its other pair is not a negative.
            same = (i[:, None] == i[None, :]) | (j[:, None] == j[None, :])
            logits = logits.masked_fill(same & ~torch.eye(len(b), dtype=torch.bool), -1e4)
            if cfg.loss == "dsl":
                contrastive = dual_softmax_loss(logits, cfg.dsl_temperature)
            elif cfg.loss == "infonce":
                contrastive = info_nce(logits)
            else:
                raise ValueError(f"align.loss must be infonce or dsl, got {cfg.loss!r}")
            content = (2 - (zi * z_raw[i]).sum(1).mean() - (zj * z_raw[j]).sum(1).mean()) / 2
            loss = contrastive + cfg.content_weight * content
            opt.zero_grad()
            loss.backward()
            opt.step()
            sums["contrastive"] += contrastive.item()
            sums["content"] += content.item()
            bar.update(1)
        history.append({"epoch": epoch + 1, **{k: v / steps for k, v in sums.items()}})
        bar.set_postfix(loss=f"{history[-1]['contrastive']:.3f}")
    bar.close()
    return model.eval(), history


def pair_rows(pairs: pd.DataFrame, ids: np.ndarray, sources) -> tuple[np.ndarray, np.ndarray]:
    """Behaviour pairs (columns src, dst, source: item ids) → row indices into ``ids``.

    Keeps the pairs of the given sources whose two items both have a row, sorted by (source,
    src, dst): pairs arrive in no fixed order (Spark), and a seeded run must see the same
    batches."""
    row = {int(i): k for k, i in enumerate(ids)}
    pairs = pairs[pairs.source.isin(list(sources))]
    pairs = pairs[pairs.src.isin(row) & pairs.dst.isin(row)]
    pairs = pairs.sort_values(["source", "src", "dst"], kind="stable")
    return pairs.src.map(row).to_numpy(), pairs.dst.map(row).to_numpy()


def item_texts(items: pd.DataFrame, ids: np.ndarray) -> list[str]:
    """The encoder's text input (title, text, tags) of each item id, in ``ids`` order."""
    t = items.set_index("item_id").loc[ids]
    return [item_text(a, b, c) for a, b, c in zip(t.title, t.text, t.tags)]


@dataclass
class Alignment:
    #: The aligned encoder: trained fusion, and tuned text layers when configured.
    encoder: ItemEncoder
    #: Per-epoch loss parts.
    history: list[dict]
    #: The packed tower features recomputed with the tuned text tower (None when the towers
    #: stayed frozen: the input features still hold).
    features: Optional[np.ndarray]


def align_encoder(encoder: ItemEncoder, feats: np.ndarray, present: np.ndarray,
                  src: np.ndarray, dst: np.ndarray, cfg: AlignConfig,
                  texts: Optional[list[str]] = None, progress: bool = True) -> Alignment:
    """Align ``encoder`` on behaviour pairs of rows of the packed tower features ``feats``
    (N, sum of tower dims) / ``present`` (N, modalities); ``texts`` (one per row) is needed when
    ``cfg.tune_text_layers > 0``; ``progress``: a progress bar."""
    features = unpack_features(feats, present, encoder.towers.dims())
    fusion, history = train_alignment(encoder.fusion, features, src, dst, cfg, progress,
                                      text_tower=encoder.towers.text, texts=texts)
    text_state, new_feats = None, None
    if cfg.tune_text_layers:
        text_state = encoder.towers.text.last_layers(cfg.tune_text_layers)
        # The text tower changed: recompute every item's text features before re-embedding.
        new_feats = _replace_text_features(encoder, feats, texts)
    aligned = ItemEncoder(encoder.cfg, fusion.state_dict(), towers=encoder.towers,
                          text_state=text_state)
    return Alignment(aligned, history, new_feats)


def _replace_text_features(encoder: ItemEncoder, feats: np.ndarray, texts: list[str],
                           batch: int = 256) -> np.ndarray:
    """``feats`` with its text block (the first block of the packed features) recomputed by the
    (tuned) text tower."""
    dt = encoder.towers.dims()["text"]
    out = feats.copy()
    for s in range(0, len(texts), batch):
        out[s:s + batch, :dt] = encoder.towers.text(texts[s:s + batch]).numpy()
    return out.astype(np.float32)
