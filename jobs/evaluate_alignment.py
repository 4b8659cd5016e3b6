"""Raw vs aligned embeddings on held-out behaviour (and, on the synthetic world, on ground truth).

Held-out behaviour comes from the evaluation period (at or after the training end): each user's
consecutive positives (next-click pairs), and Swing pairs mined on that period alone. For each,
Recall@10 / NDCG@10 of retrieving the partner among all items by cosine. On the synthetic world,
nearest-neighbour purity (k = 10) of the behavioural topic and of the nuisance attributes
(colour, background): alignment should raise the first and lower the others.
"""

from __future__ import annotations

import numpy as np

from feature_store.snapshots import Manifest
from mm_encoder.evaluation import chance_purity, knn_purity, retrieval_metrics


def read_vectors(store, m: Manifest):
    """(item ids ascending, float32 embedding matrix in that order) of an embeddings snapshot."""
    t = store.read_arrow(m.table, m.snapshot_id)
    ids = t.column("item_id").to_numpy()
    vecs = t.column("embedding").combine_chunks().flatten().to_numpy(
        zero_copy_only=False).reshape(len(ids), -1)
    order = np.argsort(ids)
    return ids[order], np.ascontiguousarray(vecs[order], dtype=np.float32)


def evaluate_alignment(ctx, events, train_end, raw_m: Manifest, aligned_m: Manifest,
                       k: int = 10) -> tuple[str, dict]:
    from pipelines.pairs import PairsConfig, next_positive_pairs, positives, swing_scores, \
        user_items
    from pyspark.sql import functions as F

    store = ctx.store
    nxt = next_positive_pairs(events, train_end).select("src", "dst").toPandas()
    heldout = events.where(F.col("ts") >= F.lit(train_end))
    cfg = PairsConfig(min_support=1)
    far_future = train_end.replace(year=train_end.year + 100)
    sw = swing_scores(user_items(positives(heldout, far_future), cfg), cfg).toPandas()
    sets = {"next-click": nxt, "held-out swing": sw}
    ids_r, raw = read_vectors(store, raw_m)
    ids_a, ali = read_vectors(store, aligned_m)
    rows, metrics = [], {}
    for name, p in sets.items():
        r = retrieval_metrics(ids_r, raw, p.src.to_numpy(), p.dst.to_numpy(), k)
        a = retrieval_metrics(ids_a, ali, p.src.to_numpy(), p.dst.to_numpy(), k)
        rows.append((name, r["pairs"], r[f"recall@{k}"], a[f"recall@{k}"], r[f"ndcg@{k}"],
                     a[f"ndcg@{k}"]))
        key = name.replace(" ", "_").replace("-", "_")
        metrics.update({f"{key}.raw.recall_at_{k}": r[f"recall@{k}"],
                        f"{key}.aligned.recall_at_{k}": a[f"recall@{k}"],
                        f"{key}.raw.ndcg_at_{k}": r[f"ndcg@{k}"],
                        f"{key}.aligned.ndcg_at_{k}": a[f"ndcg@{k}"]})
    lines = [f"held-out behaviour      pairs  Recall@{k} raw  aligned   NDCG@{k} raw  aligned"]
    for name, n, rr, ar, rn, an in rows:
        lines.append(f"{name:<20} {n:>8}  {rr:>12.4f}  {ar:>7.4f}  {rn:>11.4f}  {an:>7.4f}")

    truth_m, map_m = ctx.upstream("truth_items"), ctx.upstream("item_id_map")
    if truth_m is not None and map_m is not None:
        truth = store.read_arrow("truth_items", truth_m.snapshot_id).to_pandas()
        idmap = store.read_arrow("item_id_map", map_m.snapshot_id).to_pandas()
        truth = truth.merge(idmap, left_on="item_id", right_on="external_id")
        truth = truth.set_index("id").loc[ids_r]
        lines.append(f"synthetic ground truth: {k}-NN purity   raw  aligned  chance")
        for attr in ("topic", "colour", "background", "shape"):
            labels = truth[attr].to_numpy()
            pr, pa_ = knn_purity(raw, labels, k), knn_purity(ali, labels, k)
            lines.append(f"  {attr:<12}{'(behaviour)' if attr == 'topic' else '(nuisance)' if attr in ('colour', 'background') else '(content)':<13}"
                         f"{pr:>10.4f}  {pa_:>7.4f}  {chance_purity(labels):>6.4f}")
            metrics[f"purity.{attr}.raw"] = pr
            metrics[f"purity.{attr}.aligned"] = pa_
    return "\n".join(lines), metrics
