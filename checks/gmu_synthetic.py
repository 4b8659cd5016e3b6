"""GMU on held-out synthetic grounding videos (``make gmu-check``), JSON on stdout.

Untrimmed videos of the synthetic world's visual vocabulary (2-4 events one after another, each
an object crossing the frame, with its caption and true span), frame features from MobileNetV2,
query tokens from MiniLM. One split by video (20% of the videos held out, the same for every
run); each variant trained with 3 seeds (initialisation and order):

* moment level only; clip level only; both levels without the generator; full GMU;
* the trivial baseline: the training spans' average length at their average centre.

Per variant: R@1 and R@5 at IoU 0.3/0.5/0.7 and mIoU, the mean over seeds with a 95% t
interval over the 3 seeds, and full GMU minus each other variant per seed (paired by seed).

    .venv/bin/python checks/gmu_synthetic.py [--videos 600] [--seeds 3] [--epochs 40]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

#: t quantile (0.975) by degrees of freedom, for intervals over a few seeds.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 9: 2.262}

VARIANTS = {
    "moment level only": dict(moment=True, clip=False, generator=False),
    "clip level only": dict(moment=False, clip=True, generator=False),
    "both levels, no generator": dict(moment=True, clip=True, generator=False),
    "full GMU": dict(moment=True, clip=True, generator=True),
}


def interval(values) -> dict:
    v = np.asarray(values, float)
    mean = float(v.mean())
    if len(v) < 2:
        return {"mean": mean, "lo": mean, "hi": mean, "seeds": v.tolist()}
    half = T975.get(len(v) - 1, 1.96) * float(v.std(ddof=1)) / np.sqrt(len(v))
    return {"mean": round(mean, 2), "lo": round(mean - half, 2), "hi": round(mean + half, 2),
            "seeds": [round(x, 2) for x in v.tolist()]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=600)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(2)
    from mm_encoder.config import GroundingConfig
    from mm_encoder.gmu import grounding_metrics, split_by_video, train_gmu, trivial_spans
    from mm_encoder.towers import MobileNetV2Tower, TextTower
    from pipelines.grounding import synthetic_set

    t0 = time.time()
    data = synthetic_set(a.videos, a.frames, 24, 100, MobileNetV2Tower(image_size=a.image_size),
                         TextTower(), 16, a.frames)
    base = GroundingConfig(max_frames=a.frames, epochs=a.epochs)
    train_idx, test_idx = split_by_video(data, base.holdout, 0)
    features_s = time.time() - t0
    per: dict[str, list[dict]] = {k: [] for k in VARIANTS}
    for name, parts in VARIANTS.items():
        for seed in range(a.seeds):
            cfg = dataclasses.replace(base, seed=seed, **parts)
            res = train_gmu(data, cfg, train_idx, test_idx)
            per[name].append(res.metrics)
            print(json.dumps({"variant": name, "seed": seed, **{k: round(v, 1) for k, v in
                                                                 res.metrics.items()}}),
                  file=sys.stderr)
    test = data.take(test_idx)
    trivial = grounding_metrics(trivial_spans(data.spans[train_idx], len(test_idx)), test.spans)
    keys = list(per["full GMU"][0])
    table = {name: {k: interval([m[k] for m in runs]) for k in keys}
             for name, runs in per.items()}
    table["trivial (mean span)"] = {k: {"mean": round(v, 2)} for k, v in trivial.items()}
    diffs = {f"full GMU - {name}": {k: interval([f[k] - m[k] for f, m in
                                                 zip(per["full GMU"], runs)])
                                    for k in ("R@1@0.5", "R@1@0.7", "mIoU")}
             for name, runs in per.items() if name != "full GMU"}
    out = {"check": "gmu_synthetic", "videos": a.videos, "frames": a.frames,
           "queries_train": len(train_idx), "queries_held_out": len(test_idx),
           "seeds": a.seeds, "epochs": a.epochs, "features_s": round(features_s, 1),
           "wall_s": round(time.time() - t0, 1), "table": table, "paired": diffs}
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
