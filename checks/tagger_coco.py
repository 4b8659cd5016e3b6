"""Multi-label tagging on real images: ``../shared/data/coco128-train`` (128 COCO images, each
image's label set = the classes of its boxes), 4-fold cross-validation, every variant at the same
resolution and training budget. Prints JSON.

Variants:

(a) ``mobilenet_linear``: MobileNetV2 with its packaged ImageNet weights, frozen, pooled
    features + a linear head trained with ASL;
(b) ``mltr_scratch``: MlTr (micro) from random weights;
(c) ``mltr_pretrained``: MlTr (micro) first trained on the synthetic world's items and tags (the
    ``pretrain`` stage's task), then fine-tuned (new head) on the fold;
and the label-frequency baseline. mAP per fold over the labels with a positive in the test fold,
then mean and standard deviation over the folds.

    .venv/bin/python checks/tagger_coco.py [--size 64] [--epochs 40] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128-train"


def load_coco(root: Path, size: int):
    import yaml

    from mm_encoder.towers import decode_rgb

    names = yaml.safe_load((root / "classes.yaml").read_text())["names"]
    images, tags = [], []
    for path in sorted((root / "images").glob("*.jpg")):
        label = root / "labels" / (path.stem + ".txt")
        classes = set()
        if label.exists():
            for line in label.read_text().splitlines():
                if line.strip():
                    classes.add(names[int(line.split()[0])])
        images.append(decode_rgb(path.read_bytes(), size))
        tags.append(sorted(classes))
    return images, tags


def synthetic_backbone(size: int, epochs: int, seed: int = 0) -> tuple[dict, dict]:
    """MlTr micro trained on the synthetic world's items (rendered at 32 px, resized)."""
    from mm_encoder.config import PretrainConfig
    from mm_encoder.tagger import train_tagger
    from mm_encoder.towers import decode_rgb, to_tensor
    from pipelines import synthetic as syn
    from pipelines.config import WorldConfig

    import pyarrow as pa

    wcfg = WorldConfig(n_items=1500, n_users=10, impressions_per_user=1, seed=seed)
    table = pa.concat_tables(syn.item_chunks(wcfg, syn.draw_latents(wcfg), progress=False))
    imgs = [decode_rgb(b, size) for b in table.column("image").to_pylist()]
    tags = table.column("tags").to_pylist()
    res = train_tagger(to_tensor(imgs), tags, np.arange(len(imgs)),
                       PretrainConfig(image_size=size, epochs=epochs, seed=seed))
    return res.model.state_dict(), {"mAP": res.metrics["mAP"], "baseline": res.baseline["mAP"]}


def linear_probe(feats: torch.Tensor, y: np.ndarray, train: np.ndarray, epochs: int,
                 lr: float = 1e-2) -> np.ndarray:
    from mm_encoder.losses import asymmetric_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(feats.shape[1], y.shape[1])
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    x, t = feats[train], torch.from_numpy(y[train])
    for _ in range(epochs * 4):
        loss = asymmetric_loss(head(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return torch.sigmoid(head(feats[~train])).numpy()


def main() -> None:
    from mm_encoder.config import PretrainConfig
    from mm_encoder.mltr import multilabel_metrics
    from mm_encoder.tagger import label_matrix, train_tagger, vocabulary
    from mm_encoder.towers import MobileNetV2Tower, to_tensor

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--pretrain-epochs", type=int, default=30)
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    images, tags = load_coco(DATA, a.size)
    x = to_tensor(images)
    n = len(images)
    fold_of = np.random.default_rng(0).permutation(n) % a.folds
    with torch.no_grad():
        mobilenet = MobileNetV2Tower(image_size=a.size).forward_tensor(x)
    init, pre = synthetic_backbone(a.size, a.pretrain_epochs)
    cfg = PretrainConfig(image_size=a.size, epochs=a.epochs, batch_size=16, min_count=1)
    out = {v: [] for v in ("frequency", "mobilenet_linear", "mltr_scratch", "mltr_pretrained")}
    for f in range(a.folds):
        hold = fold_of == f
        vocab = vocabulary(tags, ~hold, 1)
        y = label_matrix(tags, vocab)
        ho = y[hold]

        def score(probs):
            return multilabel_metrics(probs, ho)["mAP"]

        out["frequency"].append(score(np.broadcast_to(y[~hold].mean(0), ho.shape)))
        out["mobilenet_linear"].append(score(linear_probe(mobilenet, y, ~hold, a.epochs)))
        for name, start in (("mltr_scratch", None), ("mltr_pretrained", init)):
            res = train_tagger(x, tags, np.arange(n), cfg, hold=hold, init=start)
            assert res.vocab == vocab
            out[name].append(res.metrics["mAP"])
    summary = {k: {"folds": [round(v, 4) for v in vals], "mean": round(float(np.mean(vals)), 4),
                   "std": round(float(np.std(vals)), 4)} for k, vals in out.items()}
    result = {"images": n, "size": a.size, "epochs": a.epochs, "folds": a.folds,
              "synthetic_pretraining": {"epochs": a.pretrain_epochs,
                                        **{k: round(v, 4) for k, v in pre.items()}},
              "mAP": summary, "best": max(summary, key=lambda k: summary[k]["mean"]),
              "seconds": round(time.time() - t0, 1)}
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
