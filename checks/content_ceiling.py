"""How far content can take a ranker on the synthetic world (``make ceiling-check``): JSON on
stdout, a table on stderr.

The ablation's arms read item content through learned embeddings; the world knows what the
content really is. This check trains the project's logistic MF baseline
(``recsys.baselines.train_mf``, ``train.mf`` settings, early stopping on the validation part)
on a finished run's split, each item's vector extended by a learned projection of one fixed
content table (``item_features``), one variant per table:

* ``ids``: none (the ablation's ``mf`` arm);
* ``aligned``: the run's aligned item embeddings (what the ``frozen_aligned`` arm reads);
* ``content``: a perfect content encoder, one-hot of the item's shape, motion, colour and
  background (everything its image, video and text show, without error);
* ``posterior``: the Bayes posterior over topics given shape and motion, from the world's own
  fidelities (the most a content model can know of the topic);
* ``topic``: the true topic, one-hot (no content shows it this well: the upper bound).

Each variant with ``--seeds`` seeds (initialisation and order); test AUC overall and on cold
items, averaged over seeds, with 95% bootstrap intervals over users and paired differences
(``recsys.ablation.ablation_stats``, the ablation's statistics). Also the 10-NN topic purity of
the aligned embeddings against that of a perfect (shape, motion) encoder (neighbours drawn
from the item's own (shape, motion) cell).

    .venv/bin/python checks/content_ceiling.py --root .qarm [--config configs/demo.yaml]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

VARIANTS = ("ids", "aligned", "content", "posterior", "topic")
PAIRS = (("content", "aligned"), ("posterior", "aligned"), ("aligned", "ids"),
         ("topic", "posterior"))


def topic_posterior(shape: np.ndarray, motion: np.ndarray, world) -> np.ndarray:
    """[items, topics]: P(topic | shape, motion) under the world's generator (uniform topics;
    the shape is the topic's with probability ``shape_fidelity``, else uniform; the same for
    the motion)."""
    from pipelines.synthetic import MOTIONS, SHAPES, topic_motion, topic_shape

    k = world.n_topics
    ts = np.array([topic_shape(t) for t in range(k)])
    tm = np.array([topic_motion(t) for t in range(k)])
    fs, fm = world.shape_fidelity, world.motion_fidelity
    p_s = np.where(shape[:, None] == ts[None], fs, 0.0) + (1 - fs) / len(SHAPES)
    p_m = np.where(motion[:, None] == tm[None], fm, 0.0) + (1 - fm) / len(MOTIONS)
    post = p_s * p_m
    return post / post.sum(1, keepdims=True)


def one_hot(codes: np.ndarray) -> np.ndarray:
    _, inv = np.unique(codes, return_inverse=True)
    return np.eye(inv.max() + 1, dtype=np.float32)[inv]


def cell_purity(topic: np.ndarray, cell: np.ndarray) -> float:
    """Mean over items of the share of the other items of its cell with its topic (neighbours
    drawn from the item's own cell; an item alone in its cell counts 0)."""
    df = pd.DataFrame({"t": topic, "c": cell})
    same = df.groupby(["c", "t"]).t.transform("size").to_numpy()
    n = df.groupby("c").t.transform("size").to_numpy()
    return float(np.mean(np.where(n > 1, (same - 1) / np.maximum(n - 1, 1), 0.0)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=".qarm", help="paths.root of a finished synthetic run")
    ap.add_argument("--config", help="the run's config (for the world's fidelities)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args()

    import torch

    from feature_store.snapshots import SnapshotStore
    from jobs.config import load_config
    from mm_encoder.evaluation import chance_purity, knn_purity
    from recsys.ablation import ablation_stats
    from recsys.baselines import train_mf

    torch.set_num_threads(1)
    cfg = load_config(args.config, [f"paths.root={args.root}"])
    store = SnapshotStore(cfg.store_uri)
    cols = ["user_id", "item_id", "label", "cold", "new_user"]
    train, valid, test = (store.read_arrow(t, columns=cols).to_pandas()
                          for t in ("train_examples", "valid_examples", "eval_examples"))
    truth = store.read_arrow("truth_items").to_pandas().merge(
        store.read_arrow("item_id_map").to_pandas(), left_on="item_id", right_on="external_id")
    truth = truth.set_index("id").sort_index()
    n = int(max(truth.index.max(), *(d.item_id.max() for d in (train, valid, test)))) + 1
    if len(truth) != n or (truth.index.to_numpy() != np.arange(n)).any():
        raise SystemExit("the run's truth_items do not cover its dense item ids")
    emb = store.read_arrow("aligned_item_embeddings").to_pandas()
    aligned = np.zeros((n, len(emb.embedding.iloc[0])), np.float32)
    aligned[emb.item_id.to_numpy()] = np.stack(emb.embedding.to_numpy())

    from pipelines.synthetic import ALL_SHAPES, MOTIONS
    shape = np.array([ALL_SHAPES.index(s) for s in truth["shape"]])
    motion = np.array([MOTIONS.index(m) for m in truth["motion"]])
    topic = truth["topic"].to_numpy()
    if topic.max() >= cfg.world.n_topics:
        raise SystemExit("the world drifted (topics beyond world.n_topics): the posterior "
                         "knows only the original topics")
    features = {
        "ids": None,
        "aligned": aligned,
        "content": np.concatenate([one_hot(truth[c].to_numpy())
                                   for c in ("shape", "motion", "colour", "background")], 1),
        "posterior": topic_posterior(shape, motion, cfg.world).astype(np.float32),
        "topic": one_hot(topic),
    }
    rows, fits = [], {}
    t0 = time.perf_counter()
    for name in VARIANTS:
        for seed in range(args.seeds):
            r = train_mf(train, valid, test, cfg.train.mf, seed, item_features=features[name])
            fits.setdefault(name, []).append(r.best_epoch)
            rows.append(test.assign(arm=name, seed=seed, score=r.test_scores))
            print(f"{name} seed {seed}: best epoch {r.best_epoch}", file=sys.stderr, flush=True)
    stats = ablation_stats(pd.concat(rows, ignore_index=True), B=args.bootstrap, pairs=PAIRS,
                           slices=("all", "cold"))
    out = {"check": "content_ceiling", "root": args.root, "seeds": args.seeds,
           "minutes": round((time.perf_counter() - t0) / 60, 1),
           "test_examples": len(test), "cold_examples": int(test.cold.sum()),
           "best_epochs": fits,
           "purity": {"aligned_10nn": knn_purity(aligned, topic),
                      "perfect_shape_motion": cell_purity(topic, shape * 100 + motion),
                      "chance": chance_purity(topic)},
           "rows": [{k: r[k] for k in ("arm", "slice", "n", "auc", "auc_ci")}
                    for r in stats.rows],
           "pairs": [p for p in stats.pairs if p["metric"] == "auc"]}
    lines = [f"{'variant':10s} {'AUC':>7s} {'interval':>17s} {'cold AUC':>9s} {'interval':>17s}"]
    nan = {"auc": float("nan"), "auc_ci": [float("nan")] * 2}
    for name in VARIANTS:
        by = {r["slice"]: r for r in stats.rows if r["arm"] == name}
        a, c = by.get("all", nan), by.get("cold", nan)        # a tiny run may have no cold item
        lines.append(f"{name:10s} {a['auc']:7.4f} [{a['auc_ci'][0]:.3f}, {a['auc_ci'][1]:.3f}]"
                     f" {c['auc']:9.4f} [{c['auc_ci'][0]:.3f}, {c['auc_ci'][1]:.3f}]")
    for p in out["pairs"]:
        lines.append(f"  {p['a'] + ' - ' + p['b']:22s} {p['slice']:4s} {p['diff']:+.4f} "
                     f"[{p['ci'][0]:+.4f}, {p['ci'][1]:+.4f}]")
    pur = out["purity"]
    lines.append(f"10-NN topic purity: aligned {pur['aligned_10nn']:.3f}, perfect (shape, motion) "
                 f"{pur['perfect_shape_motion']:.3f}, chance {pur['chance']:.3f}")
    print("\n".join(lines), file=sys.stderr)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
