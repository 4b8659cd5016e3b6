"""Contrastive losses and alignment training on small real tensors."""

from __future__ import annotations

import numpy as np
import torch

from mm_encoder.align import AlignConfig, train_alignment
from mm_encoder.evaluation import knn_purity, retrieval_metrics
from mm_encoder.item_encoder import FusionHead, TowerFeatures
from mm_encoder.losses import asymmetric_loss, dual_softmax_loss, info_nce


def test_dsl_tends_to_infonce_for_a_large_prior_temperature():
    torch.manual_seed(0)
    s = torch.randn(8, 8) * 3
    assert torch.allclose(dual_softmax_loss(s, temperature=1e9), info_nce(s), atol=1e-5)
    assert not torch.allclose(dual_softmax_loss(s, temperature=1.0), info_nce(s), atol=1e-3)


def _dsl_by_hand(s, temperature, detach_prior):
    """DSL written out from the paper (REFERENCE.md), independently of the library."""
    b = s.shape[0]

    def one_side(m):
        z = m / temperature
        prior = torch.exp(z - torch.logsumexp(z, dim=0, keepdim=True))  # softmax down columns
        if detach_prior:
            prior = prior.detach()
        revised = m * prior * b
        return (torch.logsumexp(revised, dim=1) - revised.diagonal()).mean()

    return 0.5 * (one_side(s) + one_side(s.T))


def _grad(loss_fn, s):
    s = s.clone().requires_grad_(True)
    loss = loss_fn(s)
    loss.backward()
    return loss.detach(), s.grad


def test_dsl_gradient_flows_through_the_prior():
    torch.manual_seed(0)
    s = torch.randn(6, 6, dtype=torch.float64) * 3
    t = 1.0  # small enough that the prior is far from uniform and its gradient matters
    loss, grad = _grad(lambda m: dual_softmax_loss(m, temperature=t), s)
    ref_loss, ref_grad = _grad(lambda m: _dsl_by_hand(m, t, detach_prior=False), s)
    _, detached_grad = _grad(lambda m: _dsl_by_hand(m, t, detach_prior=True), s)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-10)
    # A detached prior gives a clearly different gradient (0.71 apart at this seed, max |g| 1.6).
    assert (grad - detached_grad).abs().max() > 0.2, (grad - detached_grad).abs().max()


def test_asl_without_focusing_is_binary_cross_entropy():
    torch.manual_seed(0)
    logits, y = torch.randn(5, 7), (torch.rand(5, 7) > 0.5).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum") / 5
    assert torch.allclose(asymmetric_loss(logits, y, 0.0, 0.0, 0.0), bce, atol=1e-5)
    assert asymmetric_loss(logits, y) < bce  # the default focuses away easy negatives


def test_alignment_pulls_behaviour_pairs_together_and_keeps_content():
    rng = np.random.default_rng(0)
    n, k = 400, 4
    topic = rng.integers(0, k, n)
    nuisance = rng.integers(0, k, n)
    # Content features: the nuisance dominates, the topic is a faint signal.
    text = rng.standard_normal((n, 32)) * 0.5
    text[np.arange(n), nuisance] += 4.0
    text[np.arange(n), 8 + topic] += 1.0
    feats = TowerFeatures({"text": torch.tensor(text, dtype=torch.float32)},
                          {"text": torch.ones(n, dtype=torch.bool)})
    # Behaviour pairs: mostly same topic.
    src = rng.integers(0, n, 3000)
    dst = np.array([rng.choice(np.flatnonzero(topic == topic[s])) if rng.random() < 0.8
                    else rng.integers(0, n) for s in src])
    fusion = FusionHead({"text": 32}, 16, seed=0)
    with torch.no_grad():
        raw = fusion(feats).numpy()
    aligned_head, history = train_alignment(fusion, feats, src, dst,
                                            AlignConfig(epochs=6, batch_size=128),
                                            progress=False)
    with torch.no_grad():
        aligned = aligned_head(feats).numpy()
    assert history[-1]["contrastive"] < history[0]["contrastive"]
    assert knn_purity(aligned, topic) > knn_purity(raw, topic) + 0.1
    assert knn_purity(aligned, nuisance) < knn_purity(raw, nuisance)
    # The content term keeps items recognisable: aligned stays nearer its own raw vector.
    assert (aligned * raw).sum(1).mean() > 0.3
    # The original head is untouched (training works on a copy).
    with torch.no_grad():
        np.testing.assert_allclose(fusion(feats).numpy(), raw)


def test_retrieval_metrics_by_hand():
    ids = np.array([10, 11, 12, 13])
    v = np.array([[1, 0], [0.9, 0.1], [0, 1], [-1, 0]], np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    m = retrieval_metrics(ids, v, np.array([10, 10, 12]), np.array([11, 13, 11]), k=2)
    # 10 → 11 is rank 1 (hit), 10 → 13 is rank 3 (miss), 12 → 11 is rank 1 (hit)
    assert m["pairs"] == 3 and m["recall@2"] == 2 / 3
    assert np.isclose(m["ndcg@2"], (1.0 + 0 + 1.0) / 3)


def test_tuning_the_text_towers_last_layer_trains_only_that_layer(tmp_path):
    from mm_encoder.item_encoder import ItemEncoder, ItemEncoderConfig
    from mm_encoder.towers import TextTower

    tower = TextTower(max_length=16)
    texts = [f"a {c} {s} moves {m}" for c in ("red", "blue") for s in ("circle", "square", "star")
             for m in ("left", "right")]
    n = len(texts)
    feats = TowerFeatures({"text": tower(texts)}, {"text": torch.ones(n, dtype=torch.bool)})
    before = {k: v.detach().clone() for k, v in tower.model.named_parameters()}
    rng = np.random.default_rng(0)
    src, dst = rng.integers(0, n, 40), rng.integers(0, n, 40)
    fusion = FusionHead({"text": tower.dim}, 8, seed=0)
    cfg = AlignConfig(epochs=1, batch_size=8, tune_text_layers=1, text_lr=1e-3)
    head, _ = train_alignment(fusion, feats, src, dst, cfg, progress=False, text_tower=tower,
                              texts=texts)
    last = len(tower.model.encoder.layer) - 1
    changed = {k for k, v in tower.model.named_parameters() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(f"encoder.layer.{last}.") for k in changed)
    # The tuned layer travels in the encoder artifact and changes its version.
    state = tower.last_layers(1)
    enc = ItemEncoder(ItemEncoderConfig(dim=8, image_tower="none"), head.state_dict(),
                      text_state=state)
    plain = ItemEncoder(ItemEncoderConfig(dim=8, image_tower="none"), head.state_dict())
    assert enc.version != plain.version
    again = ItemEncoder.from_bytes(enc.to_bytes())
    rows = [{"title": t} for t in texts[:3]]
    np.testing.assert_allclose(again.encode(rows), enc.encode(rows), rtol=1e-5, atol=1e-6)
    assert not np.allclose(plain.encode(rows), enc.encode(rows))
