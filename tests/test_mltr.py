"""MlTr: its own component (cross-window attention) against a loop-by-loop reference, the MlTr-s
size, shapes and FLOPs, a checkpoint round trip, and the multi-label metrics against
hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mm_encoder.mltr import (CrossWindowAttention, MlTrConfig, average_precision, mltr_micro,
                             mltr_s, multilabel_metrics)


def test_metrics_against_hand_computed_values_with_a_label_without_positives():
    scores = np.array([[0.9, 0.2, 0.6],
                       [0.8, 0.7, 0.1],
                       [0.3, 0.6, 0.4],
                       [0.1, 0.4, 0.7]])
    labels = np.array([[1, 0, 0],
                       [1, 1, 0],
                       [0, 0, 0],
                       [0, 1, 0]])
    # Label 0: positives ranked 1st and 2nd → AP 1. Label 1: ranked 1st and 3rd → (1 + 2/3)/2.
    # Label 2 has no positive: left out of mAP, CP and CR.
    assert average_precision(scores[:, 1], labels[:, 1]) == pytest.approx((1 + 2 / 3) / 2)
    assert math.isnan(average_precision(scores[:, 2], labels[:, 2]))
    m = multilabel_metrics(scores, labels)
    assert m["mAP"] == pytest.approx((1 + (1 + 2 / 3) / 2) / 2)
    # At 0.5: label 0 predicts images 0, 1 (2 right); label 1 images 1, 2 (1 right, of 2
    # positives); label 2 images 0, 3 (none right, no positive).
    assert m["CP"] == pytest.approx((2 / 2 + 1 / 2) / 2)
    assert m["CR"] == pytest.approx((2 / 2 + 1 / 2) / 2)
    assert m["CF1"] == pytest.approx(0.75)
    assert m["OP"] == pytest.approx(3 / 6)
    assert m["OR"] == pytest.approx(3 / 4)
    assert m["OF1"] == pytest.approx(2 * 0.5 * 0.75 / 1.25)


def test_a_label_never_predicted_has_precision_zero():
    m = multilabel_metrics(np.array([[0.9, 0.1], [0.2, 0.3]]), np.array([[1, 1], [0, 0]]))
    assert m["CP"] == pytest.approx((1.0 + 0.0) / 2) and m["CR"] == pytest.approx(0.5)


def _reference_cross_window(mod: CrossWindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Window by window, head by head, with explicit loops."""
    B, H, W, C = x.shape
    w, h = mod.window, mod.heads
    d = C // h
    grid = [(i, j) for i in range(H // w) for j in range(W // w)]
    out = torch.zeros_like(x)
    Wqkv, bqkv = mod.qkv.weight, mod.qkv.bias
    for b in range(B):
        tokens = torch.stack([x[b, i * w:(i + 1) * w, j * w:(j + 1) * w].reshape(-1, C).mean(0)
                              for i, j in grid]) + mod.pos[:len(grid)]
        qkv = tokens @ Wqkv.T + bqkv
        q, k, v = qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:]
        heads = []
        for hh in range(h):
            sl = slice(hh * d, (hh + 1) * d)
            a = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(d), dim=1)
            heads.append(a @ v[:, sl])
        res = mod.proj(torch.cat(heads, dim=1))
        for n, (i, j) in enumerate(grid):
            out[b, i * w:(i + 1) * w, j * w:(j + 1) * w] = res[n]
    return out


def test_cross_window_attention_matches_the_reference_computation():
    torch.manual_seed(0)
    mod = CrossWindowAttention(dim=12, heads=3, window=2, grid=3)
    with torch.no_grad():
        mod.pos.normal_()
        mod.qkv.bias.normal_()
    x = torch.randn(2, 6, 6, 12)
    torch.testing.assert_close(mod(x), _reference_cross_window(mod, x), atol=1e-5, rtol=1e-5)
    # Every pixel of a window gets the same update, and windows differ.
    y = mod(x)
    assert torch.allclose(y[0, 0, 0], y[0, 1, 1]) and not torch.allclose(y[0, 0, 0], y[0, 0, 2])


def test_mltr_s_has_the_papers_size_and_the_micro_variant_runs():
    big = mltr_s(num_classes=80)
    assert abs(big.num_params() - 33e6) / 33e6 < 0.10, big.num_params()
    assert 4e9 < big.flops() < 8e9                      # Swin-T-like scale at 224 px
    micro = mltr_micro(num_classes=5)
    logits = micro(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 5) and micro.flops() > 0
    with pytest.raises(ValueError, match="does not divide"):
        MlTrConfig(img_size=60, window=7).validate()


def test_checkpoint_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    a = mltr_micro(num_classes=4).eval()
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(tmp_path / "m.st"))
    torch.manual_seed(1)
    b = mltr_micro(num_classes=4).eval()
    b.load_state_dict(load_file(str(tmp_path / "m.st")))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a(x), b(x))


# --------------------------------------------------------------------------- the tagger
def _coloured_squares(n=192, seed=0):
    """32 px images: a square of one of three colours on a dark or light background, placed in
    one of four quadrants; tags name the colour, the background and the quadrant."""
    rng = np.random.default_rng(seed)
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    imgs, tags = [], []
    for _ in range(n):
        c = list(colours)[rng.integers(0, 3)]
        light = bool(rng.integers(0, 2))
        q = int(rng.integers(0, 4))
        img = np.full((32, 32, 3), 200 if light else 20, np.uint8)
        y, x = (q // 2) * 16 + 3, (q % 2) * 16 + 3
        img[y:y + 10, x:x + 10] = colours[c]
        imgs.append(img)
        tags.append([c, "light" if light else "dark", f"q{q}"])
    return imgs, tags


def test_the_tagger_learns_beats_the_frequency_baseline_and_round_trips(tmp_path):
    import pickle

    from mm_encoder.config import PretrainConfig
    from mm_encoder.tagger import (TaggerError, holdout_mask, load_tagger, predict,
                                   save_tagger, top_tags, train_tagger)
    from mm_encoder.towers import to_tensor

    imgs, tags = _coloured_squares()
    ids = np.arange(len(imgs)) * 7 + 3
    # The held-out items depend on the ids, not on their order.
    m = holdout_mask(ids, 0.25)
    assert 0.1 < m.mean() < 0.4
    perm = np.random.default_rng(1).permutation(len(ids))
    assert (holdout_mask(ids[perm], 0.25) == m[perm]).all()
    cfg = PretrainConfig(epochs=12, batch_size=32, holdout=0.25, lr=2e-3)
    res = train_tagger(to_tensor(imgs), tags, ids, cfg)
    assert res.metrics["mAP"] > res.baseline["mAP"] + 0.2, (res.metrics, res.baseline)
    assert res.curve[-1]["loss"] < res.curve[0]["loss"]
    assert sorted(res.vocab) == res.vocab and "red" in res.vocab and len(res.vocab) == 9
    folder = save_tagger(res, tmp_path / "t")
    model, vocab, cfg2 = load_tagger(folder)
    x = to_tensor(imgs[:4])
    np.testing.assert_allclose(predict(model, x), predict(res.model, x), atol=1e-6)
    best = top_tags(predict(model, x), vocab, top=2, threshold=0.99)
    assert all(1 <= len(b) <= 2 for b in best)
    (folder / "weights.safetensors").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(TaggerError, match="never by unpickling"):
        load_tagger(folder)
    with pytest.raises(TaggerError, match="nothing to learn"):
        train_tagger(to_tensor(imgs[:40]), [["x"]] + [[]] * 39, np.arange(40), cfg)
