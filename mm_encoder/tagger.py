"""The multi-label tagger: an image backbone (MlTr or CAT) with one logit per tag, trained with
the asymmetric loss on the items' tags, judged on a held-out share of the items, and stored as
weights plus config (``weights.safetensors``, ``tagger.json``; nothing is pickled).

The held-out items are chosen by a hash of the item id (``holdout`` share), so the same items are
held out whatever the order of the input. The tag vocabulary is every tag with at least
``min_count`` training items. The frequency baseline scores every image with each tag's training
frequency (its mAP is what a tagger that ignores the image reaches).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mm_encoder.config import PretrainConfig as TaggerConfig

FORMAT = "qarm-tagger/1"


class TaggerError(ValueError):
    """Nothing to train on (no tags, too few images), or a tagger folder that is not one."""


def build_backbone(cfg: TaggerConfig, num_classes: int):
    from mm_encoder.cat import cat_micro
    from mm_encoder.mltr import mltr_micro

    if cfg.backbone == "mltr":
        return mltr_micro(num_classes=num_classes, img_size=cfg.image_size)
    if cfg.backbone == "cat":
        return cat_micro(img_size=cfg.image_size, num_classes=num_classes)
    raise TaggerError(f"pretrain.backbone must be mltr or cat, got {cfg.backbone!r}")


def holdout_mask(item_ids: np.ndarray, share: float) -> np.ndarray:
    """True for held-out items: a fixed hash of the id, not the input order."""
    h = (np.asarray(item_ids, np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
    return (h % np.uint64(10_000)).astype(np.float64) < share * 10_000


def vocabulary(tags: Sequence[Sequence[str]], train: np.ndarray, min_count: int) -> list[str]:
    counts: dict[str, int] = {}
    for t, tr in zip(tags, train):
        if tr:
            for x in set(t):
                counts[x] = counts.get(x, 0) + 1
    return sorted(k for k, c in counts.items() if c >= min_count)


def label_matrix(tags: Sequence[Sequence[str]], vocab: list[str]) -> np.ndarray:
    index = {t: i for i, t in enumerate(vocab)}
    y = np.zeros((len(tags), len(vocab)), np.float32)
    for r, t in enumerate(tags):
        for x in t:
            if x in index:
                y[r, index[x]] = 1.0
    return y


@dataclass
class TaggerResult:
    model: torch.nn.Module
    vocab: list[str]
    cfg: TaggerConfig
    curve: list[dict]                 # per epoch: loss, held-out mAP
    metrics: dict                     # held-out metrics of the final model
    baseline: dict                    # the frequency baseline's held-out metrics
    n_train: int
    n_holdout: int


def predict(model, x: torch.Tensor, batch: int = 256) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return np.concatenate([torch.sigmoid(model(x[a:a + batch])).numpy()
                               for a in range(0, len(x), batch)]) if len(x) else \
            np.zeros((0, 0), np.float32)


def train_tagger(images: torch.Tensor, tags: Sequence[Sequence[str]], item_ids: np.ndarray,
                 cfg: TaggerConfig, progress=None, hold: np.ndarray | None = None,
                 init: dict | None = None) -> TaggerResult:
    """``images``: normalised (N, 3, S, S) tensor; ``tags``: each item's tags. ``hold``: the
    held-out items (default: ``holdout_mask`` of the ids); ``init``: backbone weights to start
    from (a tagger trained on other tags: every tensor but the head's)."""
    from mm_encoder.losses import asymmetric_loss
    from mm_encoder.mltr import multilabel_metrics

    hold = holdout_mask(item_ids, cfg.holdout) if hold is None else np.asarray(hold, bool)
    train = ~hold
    vocab = vocabulary(tags, train, cfg.min_count)
    if not vocab:
        raise TaggerError(f"no tag has {cfg.min_count} training images: nothing to learn")
    if train.sum() < cfg.batch_size or hold.sum() == 0:
        raise TaggerError(f"{int(train.sum())} training and {int(hold.sum())} held-out images: "
                          f"too few for batches of {cfg.batch_size} and a held-out score")
    y = torch.from_numpy(label_matrix(tags, vocab))
    torch.manual_seed(cfg.seed)
    model = build_backbone(cfg, len(vocab))
    if init is not None:
        own = model.state_dict()
        model.load_state_dict({k: v for k, v in init.items()
                               if not k.startswith("head.") and k in own}, strict=False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=True)
    steps_per_epoch = int(train.sum()) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs
                                                * steps_per_epoch, pct_start=0.2)
    tr_idx = np.flatnonzero(train)
    x_tr, y_tr = images[tr_idx], y[tr_idx]
    x_ho, y_ho = images[hold], y[hold].numpy()
    gen = torch.Generator().manual_seed(cfg.seed)
    curve = []
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(tr_idx), generator=gen)
        losses = []
        for s in range(steps_per_epoch):
            b = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            xb = x_tr[b]
            if torch.rand(1, generator=gen).item() < 0.5:       # horizontal flip
                xb = xb.flip(3)
            loss = asymmetric_loss(model(xb), y_tr[b], cfg.gamma_pos, cfg.gamma_neg,
                                   cfg.margin)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        m = multilabel_metrics(predict(model, x_ho), y_ho)
        curve.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "holdout_mAP": m["mAP"]})
        if progress is not None:
            progress(curve[-1])
    freq = y_tr.numpy().mean(0)
    baseline = multilabel_metrics(np.broadcast_to(freq, y_ho.shape), y_ho)
    metrics = multilabel_metrics(predict(model, x_ho), y_ho)
    return TaggerResult(model.eval(), vocab, cfg, curve, metrics, baseline, len(tr_idx),
                        int(hold.sum()))


def save_tagger(res: TaggerResult, folder: Path) -> Path:
    from mm_encoder.saved import save_folder

    return save_folder(folder, res.model.state_dict(), "tagger.json", FORMAT, {
        "config": asdict(res.cfg), "vocab": res.vocab, "metrics": res.metrics,
        "baseline": res.baseline})


def load_tagger(folder: Path):
    """(model in eval mode, vocabulary, config) of a saved tagger; never unpickles."""
    from mm_encoder.saved import load_folder

    meta, state = load_folder(folder, "tagger.json", FORMAT, TaggerError, "tagger")
    cfg = TaggerConfig(**meta["config"])
    model = build_backbone(cfg, len(meta["vocab"]))
    model.load_state_dict(state)
    return model.eval(), meta["vocab"], cfg


def top_tags(probs: np.ndarray, vocab: list[str], top: int = 5, threshold: float = 0.5
             ) -> list[list[tuple[str, float]]]:
    """Per image, its tags at or above ``threshold`` (at least the best one), best first, at
    most ``top``."""
    out = []
    for p in probs:
        order = np.argsort(-p)[:top]
        keep = [(vocab[i], float(p[i])) for i in order if p[i] >= threshold]
        out.append(keep or [(vocab[order[0]], float(p[order[0]]))])
    return out

