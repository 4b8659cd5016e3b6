"""Codebook quality: utilization, perplexity, collisions, items per code, reconstruction error.

Definitions (REFERENCE.md, ranking metrics / quantizer):
utilization = share of a level's codes used; perplexity = exp(-sum p log p) of code frequencies;
collision rate = 1 - unique codes / items; relative reconstruction error with l levels =
sum ||x - x_hat_l||^2 / sum ||x||^2.
"""

from __future__ import annotations

import logging

import numpy as np


def level_stats(codes: np.ndarray, n_codes: int) -> list[dict]:
    out = []
    for level in range(codes.shape[1]):
        counts = np.bincount(codes[:, level], minlength=n_codes)
        p = counts[counts > 0] / len(codes)
        out.append({"level": level + 1, "utilization": float((counts > 0).mean()),
                    "perplexity": float(np.exp(-(p * np.log(p)).sum()))})
    return out


def prefix_stats(codes: np.ndarray) -> list[dict]:
    """Collision rate and items per code for every prefix length (the last is the full code)."""
    out = []
    for length in range(1, codes.shape[1] + 1):
        _, counts = np.unique(codes[:, :length], axis=0, return_counts=True)
        out.append({"prefix": length, "unique": int(len(counts)),
                    "collision_rate": float(1 - len(counts) / len(codes)),
                    "items_per_code_mean": float(counts.mean()),
                    "items_per_code_max": int(counts.max()),
                    "share_sharing_code": float(counts[counts > 1].sum() / len(codes))})
    return out


def reconstruction_error(rq, x: np.ndarray, codes: np.ndarray) -> list[float]:
    """Relative reconstruction error using the first 1..L levels."""
    denom = float((x.astype(np.float64) ** 2).sum())
    return [float(((x - rq.decode(codes, levels)) ** 2).sum() / denom)
            for levels in range(1, codes.shape[1] + 1)]


def codebook_metrics(rq, x: np.ndarray, codes: np.ndarray, vq_overlap: float | None) -> dict:
    return {
        "levels": level_stats(codes, rq.cfg.codes),
        "prefixes": prefix_stats(codes),
        "reconstruction_error": reconstruction_error(rq, x, codes),
        "vq_exact_overlap": vq_overlap,
        "items": int(len(codes)),
    }


def format_table(m: dict) -> str:
    lines = ["level  utilization  perplexity  rel.recon.err(<=level)"]
    for lv, err in zip(m["levels"], m["reconstruction_error"]):
        lines.append(f"{lv['level']:>5}  {lv['utilization']:>11.3f}  {lv['perplexity']:>10.1f}  "
                     f"{err:>22.4f}")
    lines.append("prefix  unique  collision  items/code(mean,max)  share sharing a code")
    for p in m["prefixes"]:
        lines.append(f"{p['prefix']:>6}  {p['unique']:>6}  {p['collision_rate']:>9.3f}  "
                     f"{p['items_per_code_mean']:>10.2f}, {p['items_per_code_max']:<8}  "
                     f"{p['share_sharing_code']:>10.3f}")
    if m.get("vq_exact_overlap") is not None:
        lines.append(f"VQ overlap with exact search: {m['vq_exact_overlap']:.3f}")
    return "\n".join(lines)


def flat_metrics(m: dict) -> dict[str, float]:
    """Metrics as flat name → number (for MLflow)."""
    out = {}
    for lv in m["levels"]:
        out[f"level{lv['level']}.utilization"] = lv["utilization"]
        out[f"level{lv['level']}.perplexity"] = lv["perplexity"]
    for p in m["prefixes"]:
        out[f"prefix{p['prefix']}.collision_rate"] = p["collision_rate"]
        out[f"prefix{p['prefix']}.items_per_code_max"] = p["items_per_code_max"]
    for i, e in enumerate(m["reconstruction_error"]):
        out[f"recon_error.levels{i + 1}"] = e
    if m.get("vq_exact_overlap") is not None:
        out["vq_exact_overlap"] = m["vq_exact_overlap"]
    return out


def behaviour_sharing(src: np.ndarray, dst: np.ndarray,
                      codes: dict[str, tuple[np.ndarray, np.ndarray]], prefixes=(1, 2),
                      seed: int = 0) -> list[dict]:
    """How often the two items of a behaviour pair share an RQ code prefix, per set of codes.

    ``src``/``dst``: item ids of held-out pairs; ``codes``: name → (item ids, (n, L) RQ codes).
    For each prefix length and each name: the share of pairs (both items coded) whose codes agree
    on the prefix, and the same share for random item pairs (the chance level; at least 1000).
    Rows: ``{"prefix", "pairs", "<name>", "<name>_random"}``."""
    rng = np.random.default_rng(seed)
    src, dst = np.asarray(src), np.asarray(dst)
    rows = []
    for prefix in prefixes:
        row = {"prefix": prefix, "pairs": int(len(src))}
        for name, (ids, rq) in codes.items():
            pos = {int(i): k for k, i in enumerate(ids)}
            keep = [(pos[int(a)], pos[int(b)]) for a, b in zip(src, dst)
                    if int(a) in pos and int(b) in pos]
            if keep:
                a, b = np.array(keep).T
                row[name] = float((rq[a, :prefix] == rq[b, :prefix]).all(1).mean())
            else:
                row[name] = 0.0
            ra, rb = rng.integers(0, len(rq), (2, max(len(keep), 1000)))
            row[f"{name}_random"] = float((rq[ra, :prefix] == rq[rb, :prefix]).all(1).mean())
        rows.append(row)
    return rows


def drift(rq, old: np.ndarray, new: np.ndarray, draws: int = 200, seed: int = 0) -> dict:
    """How far new items sit from what the codebook ``rq`` was fitted for (the daily job's
    refit trigger), against the items it already codes (``old``, its fit sample):

    * ``error_ratio``: the new items' mean squared residual after every level, over what
      unseen items of the old distribution get (1 = no drift). A codebook's error on the items
      it was fitted on is lower than on any other items, so the old items' error is scaled by
      the out-of-sample gap, measured by fitting the same codebook config on 80% of them and
      coding the other 20%.
    * ``tv``: total variation distance between the new items' level-1 code distribution and
      the old items' (0 = the same codes in the same shares).

    Each comes with ``*_null``: its 99th percentile over ``draws`` random sets of as many held-out
    old items under that 80% codebook, the value chance alone reaches with that few items from
    the old distribution (a handful of new items always looks far from the whole)."""
    from quantizer.rq import ResidualKMeans

    rng = np.random.default_rng(seed)
    n = len(new)
    if n == 0 or len(old) < 50:
        return {"new_items": n, "error_ratio": 1.0, "error_ratio_null": float("inf"),
                "tv": 0.0, "tv_null": 1.0}
    k = rq.centroids.shape[1]

    def sq_err(q, x):
        return ((x - q.decode(q.encode(x))) ** 2).sum(axis=1)

    def hist(q, x):
        return np.bincount(q.encode(x)[:, 0], minlength=k) / len(x)

    perm = rng.permutation(len(old))
    hold, fit = old[perm[: len(old) // 5]], old[perm[len(old) // 5:]]
    quiet = logging.getLogger("quantizer.kmeans")
    level = quiet.level
    quiet.setLevel(logging.ERROR)     # its few-points warning was given when rq was fitted
    try:
        ref = ResidualKMeans(rq.cfg).fit(fit)
    finally:
        quiet.setLevel(level)
    hold_err = sq_err(ref, hold)
    gap = hold_err.mean() / sq_err(ref, fit).mean()
    expected = sq_err(rq, old).mean() * gap          # what unseen old-like items would get
    hold_codes, ref_hist = ref.encode(hold)[:, 0], hist(ref, fit)
    null_ratio, null_tv = [], []
    for _ in range(draws):
        pick = rng.choice(len(hold), n, replace=n > len(hold))
        null_ratio.append(hold_err[pick].mean() / hold_err.mean())
        h = np.bincount(hold_codes[pick], minlength=k) / n
        null_tv.append(0.5 * np.abs(h - ref_hist).sum())
    return {"new_items": n, "error_ratio": float(sq_err(rq, new).mean() / expected),
            "error_ratio_null": float(np.quantile(null_ratio, 0.99)),
            "tv": float(0.5 * np.abs(hist(rq, new) - hist(rq, old)).sum()),
            "tv_null": float(np.quantile(null_tv, 0.99)), "out_of_sample_gap": float(gap)}
