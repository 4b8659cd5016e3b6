"""CAMoE and the Dual Softmax Loss: re-ranking, the per-sample loss under permutation, the gate,
the retrieval metrics against hand-computed values, training, and the saved model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mm_encoder.camoe import (CAMoE, CAMoEError, MeanPool, Pairs, dsl_rerank, evaluate_pairs,
                              load_video_text, pad_frames, ranks_of_truth, retrieval_metrics,
                              save_video_text, train_video_text)
from mm_encoder.config import VideoTextConfig
from mm_encoder.losses import dual_softmax_loss


def test_dsl_reranking_keeps_the_shape_and_flips_the_order_the_prior_should():
    # Query 0 prefers video 0 (1.0 vs 0.9), but query 1 wants video 0 as much and video 1 not
    # at all: the prior down column 0 is split in two, down column 1 it favours query 0.
    s = torch.tensor([[1.0, 0.9], [1.0, 0.0]])
    r = dsl_rerank(s, temperature=1.0)
    assert r.shape == s.shape
    assert s[0].argmax() == 0 and r[0].argmax() == 1
    p0 = torch.softmax(s[:, 0], 0)
    assert r[0, 0] == pytest.approx(float(s[0, 0] * p0[0] * 2))
    # A gallery item no other query wants keeps its order: a diagonal matrix is unchanged in
    # ranking.
    d = torch.eye(3) * 5
    assert torch.equal(dsl_rerank(d).argmax(1), torch.arange(3))


def test_jointly_permuting_queries_and_candidates_permutes_the_per_sample_loss():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 6, generator=g) * 3
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    for t in (1.0, 1000.0):
        per = dual_softmax_loss(s, t, reduction="none")
        assert per.shape == (6,)
        permuted = dual_softmax_loss(s[perm][:, perm], t, reduction="none")
        torch.testing.assert_close(permuted, per[perm])
        assert float(per.mean()) == pytest.approx(float(dual_softmax_loss(s, t)), rel=1e-6)


def _tiny_model(streams_dim=8):
    cfg = VideoTextConfig(dim=streams_dim, width=16, max_frames=4)
    torch.manual_seed(0)
    return CAMoE(cfg, frame_dim=12, token_dim=10, frames=4)


def test_gate_weights_sum_to_one_and_token_weights_skip_padding():
    m = _tiny_model().eval()
    tokens = torch.randn(5, 7, 10)
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[:, 4:] = False
    mask[0, 1:] = False                            # a one-token caption
    text, gate, weights = m.encode_text(tokens, mask)
    torch.testing.assert_close(gate.sum(1), torch.ones(5))
    assert (gate > 0).all() and gate.shape == (5, 3)
    torch.testing.assert_close(weights.sum(1), torch.ones(5, 3))
    assert (weights[:, 4:] == 0).all() and (weights[0, 0] == 1).all()
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(5, 3))
    # Padding tokens never change the text side.
    tokens2 = tokens.clone()
    tokens2[:, 4:] = 99.0
    t2, g2, _ = m.encode_text(tokens2, mask)
    torch.testing.assert_close(t2, text)
    torch.testing.assert_close(g2, gate)


def test_video_streams_ignore_padded_frames_and_read_the_order_of_frames():
    m = _tiny_model().eval()
    frames = torch.randn(2, 4, 12)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    v = m.encode_video(frames, mask)
    assert v.shape == (2, 3, 8)
    f2 = frames.clone()
    f2[0, 3] = 50.0
    torch.testing.assert_close(m.encode_video(f2, mask)[0], v[0])
    # Reversed frames: the same scene (a mean) but another action (the temporal stream).
    rev = frames.flip(1)
    vr = m.encode_video(rev, torch.ones(2, 4, dtype=torch.bool))
    torch.testing.assert_close(vr[1, 2], v[1, 2])
    assert not torch.allclose(vr[1, 0], v[1, 0], atol=1e-4)
    assert m.item_vectors(frames, mask).shape == (2, 24)


def test_retrieval_metrics_match_a_hand_computed_case():
    # Truth on the diagonal. Row ranks: 1 (best), 3 (two above), 2, 4 (last; a tie counts above).
    s = np.array([[0.9, 0.1, 0.2, 0.3],
                  [0.8, 0.5, 0.7, 0.1],
                  [0.1, 0.9, 0.5, 0.2],
                  [0.3, 0.3, 0.4, 0.3]])
    np.testing.assert_array_equal(ranks_of_truth(s), [1, 3, 2, 4])
    m = retrieval_metrics(s, ks=(1, 2, 5))
    assert m == {"R@1": 25.0, "R@2": 50.0, "R@5": 100.0, "MdR": 2.5, "MnR": 2.5}


def _pairs(n=160, seed=0):
    """Videos whose frames carry an identity code and a direction, captions that name them."""
    g = torch.Generator().manual_seed(seed)
    obj = torch.randint(0, 6, (n,), generator=g)
    motion = torch.randint(0, 4, (n,), generator=g)
    basis = torch.randn(6, 12, generator=g)
    mv = torch.randn(4, 12, generator=g)
    t = torch.arange(4).float()
    frames = basis[obj][:, None, :] + t[None, :, None] * mv[motion][:, None, :] * 0.5
    frames = frames + 0.1 * torch.randn(n, 4, 12, generator=g)
    vocab = torch.randn(10, 10, generator=g)
    tokens = torch.stack([vocab[obj], vocab[6 + motion]], dim=1)            # "object motion"
    return Pairs(frames, torch.ones(n, 4, dtype=torch.bool), tokens,
                 torch.ones(n, 2, dtype=torch.bool), np.arange(n))


def test_camoe_learns_held_out_pairs_and_round_trips(tmp_path):
    pairs = _pairs()
    hold = np.arange(len(pairs)) % 5 == 0
    cfg = VideoTextConfig(dim=8, width=16, max_frames=4, epochs=15, batch_size=32, lr=5e-3)
    res = train_video_text(pairs, cfg, hold)
    assert res.n_train == 128 and res.n_holdout == 32
    # 24 (object, motion) kinds among 32 held-out pairs: chance R@5 is ~16%.
    assert res.metrics["t2v"]["R@5"] > 50
    assert set(res.metrics) == {"t2v", "v2t", "t2v_dsl", "v2t_dsl"}
    assert res.curve[-1]["loss"] < res.curve[0]["loss"]
    res.image_tower = "mobilenet_v2"
    folder = save_video_text(res, tmp_path / "vt")
    model, meta = load_video_text(folder)
    assert meta["image_tower"] == "mobilenet_v2" and meta["frames"] == 4
    held = pairs.take(np.flatnonzero(hold))
    torch.testing.assert_close(model.item_vectors(held.frames, held.frame_mask),
                               res.model.item_vectors(held.frames, held.frame_mask))
    assert evaluate_pairs(model, held) == res.metrics
    (tmp_path / "bad").mkdir()
    with pytest.raises(CAMoEError, match="not a saved video-text model"):
        load_video_text(tmp_path / "bad")


def test_the_mean_pool_reference_trains_and_too_few_pairs_fail_clearly():
    pairs = _pairs(60)
    cfg = VideoTextConfig(model="mean_pool", loss="infonce", dim=8, epochs=3, batch_size=16)
    res = train_video_text(pairs, cfg, np.arange(60) % 4 == 0)
    assert isinstance(res.model, MeanPool) and res.model.out_dim == 8
    with pytest.raises(CAMoEError, match="too few"):
        train_video_text(pairs.take([0, 1, 2]), cfg, np.array([True, False, False]))


def test_pad_frames_keeps_evenly_spaced_frames_of_long_videos():
    vids = [torch.arange(10.0)[:, None].repeat(1, 2), torch.ones(2, 2)]
    x, m = pad_frames(vids, 4)
    assert x.shape == (2, 4, 2) and m.tolist() == [[True] * 4, [True, True, False, False]]
    assert x[0, :, 0].tolist() == [0.0, 3.0, 6.0, 9.0]
