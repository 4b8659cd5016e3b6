"""The retriever: full-ranking metrics against hand-computed cases, exclusion of the user's own
items, the data it learns from, the faiss index, and real 2-rank DMP training on a small world
whose items fall in clusters that their RQ level-1 code names."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from recsys.index import FaissIndexError, build_index, search_excluding
from recsys.retrieval import ItemFeatures, Retriever, lookup_rows, make_batch
from recsys.retrieval_data import retrieval_data, windows
from recsys.retrieval_metrics import (Queries, bootstrap_mean, evaluate_queries, rank_queries,
                                      recall_ndcg)
from recsys.retrievers import CodePrefix, ItemToItem, Tower


def test_recall_and_ndcg_against_hand_computed_cases():
    top = np.array([[5, 3, 9, 1], [2, 4, 6, 8]])
    # User 0: one target at rank 2. User 1: targets 8 (rank 4) and 7 (not retrieved).
    m = recall_ndcg(top, [np.array([3]), np.array([8, 7])], ks_recall=(1, 2, 4), ks_ndcg=(2, 4))
    assert m["recall@1"].tolist() == [0.0, 0.0]
    assert m["recall@2"].tolist() == [1.0, 0.0]
    assert m["recall@4"].tolist() == [1.0, 0.5]
    assert m["ndcg@2"][0] == pytest.approx(1 / math.log2(3))
    assert m["ndcg@4"][0] == pytest.approx(1 / math.log2(3))
    # DCG = 1/log2(5); ideal with two targets = 1 + 1/log2(3).
    assert m["ndcg@4"][1] == pytest.approx((1 / math.log2(5)) / (1 + 1 / math.log2(3)))
    assert m["ndcg@2"][1] == 0.0


def test_a_users_own_items_never_appear_in_the_evaluated_list():
    n = 30
    hist = [np.arange(0, 20), np.array([3, 4])]
    q = Queries.build([7, 8], hist, [[25], [4, 5]])
    # Re-consumption is not retrieval: user 8's target 4 is dropped, 5 stays.
    assert q.targets(1).tolist() == [5]
    # Scores that rank the history first: it must be skipped.
    bias = torch.linspace(1, 0, n)
    top = rank_queries(lambda idx: bias.expand(len(idx), -1), q, n, k=10)
    for u in range(len(q)):
        assert not set(top[u]) & set(q.history(u))
    assert top[0].tolist() == list(range(20, 30))
    m = evaluate_queries(lambda idx: bias.expand(len(idx), -1), q, n)
    assert m["recall@10"].tolist() == [1.0, 1.0]
    # The faiss path skips them as well.
    vec = np.eye(n, dtype=np.float32)
    ids, _ = search_excluding(build_index(vec), vec[[0, 3]], 5, hist)
    assert not set(ids[0]) & set(hist[0]) and not set(ids[1]) & set(hist[1])


def test_queries_and_sequences_from_the_split():
    ev = pd.DataFrame({
        "user_id": [1] * 6 + [2] * 3,
        "item_id": [10, 11, 12, 13, 14, 15, 20, 21, 22],
        "ts": pd.to_datetime([1, 2, 3, 4, 5, 6, 1, 2, 3], unit="s"),
        "label": [1, 1, 0, 1, 1, 1, 1, 1, 1],
        "part": ["train", "train", "train", "train", "valid", "test", "train", "train",
                 "test"]})
    d = retrieval_data(ev, 30, max_len=2)
    # User 1's training positives 10, 11, 13 (12 was not clicked): windows of 3.
    assert [s.tolist() for s in d.sequences] == [[10, 11, 13], [20, 21]]
    assert d.valid.users.tolist() == [1] and d.valid.targets(0).tolist() == [14]
    assert d.test.users.tolist() == [1, 2]
    assert d.test.history(0).tolist() == [10, 11, 13, 14] and d.test.targets(0).tolist() == [15]
    assert d.cold[15] and d.cold[22] and not d.cold[12]          # 12 had a training event
    assert d.popularity[10] == 1 and d.popularity[12] == 0
    assert [w.tolist() for w in windows(np.arange(6), 3)] == [[0, 1], [1, 2, 3], [3, 4, 5]]
    assert windows(np.arange(1), 3) == []


def test_codes_outside_the_tables_are_refused_clearly():
    from recsys.retrieval import RetrievalError

    with pytest.raises(RetrievalError, match="not below the codes per level"):
        ItemFeatures.build(3, [0, 1], [[0, 5], [1, 1]], [[1], [2]], 4, np.zeros(3))
    with pytest.raises(RetrievalError, match="VQ bag names an item outside"):
        ItemFeatures.build(3, [0, 1], [[0, 1], [1, 1]], [[1], [7]], 4, np.zeros(3))


def test_the_global_batch_fits_small_data():
    from recsys.config import RetrievalConfig
    from recsys.retrieval_eval import global_batch

    assert global_batch(RetrievalConfig(batch_size=128, ranks=2), 1000) == 128
    assert global_batch(RetrievalConfig(batch_size=128, ranks=2), 41) == 40
    with pytest.raises(ValueError, match="cannot feed 2 ranks"):
        global_batch(RetrievalConfig(batch_size=128, ranks=2), 1)
    with pytest.raises(ValueError, match="divide evenly"):
        global_batch(RetrievalConfig(batch_size=127, ranks=2), 1000)


def test_bootstrap_of_identical_values_is_a_point():
    s = bootstrap_mean({"r": np.full(20, 0.25)}, 100)
    assert s["r"] == (0.25, 0.25, 0.25)


def test_index_factories_and_a_clear_error():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    flat = build_index(x, "Flat")
    for factory in ("IVF4,Flat", "HNSW16"):
        idx = build_index(x, factory)
        assert idx.ntotal == 500
        a, _ = search_excluding(idx, x[:5], 10, [np.zeros(0, np.int64)] * 5)
        assert (a[:, 0] == np.arange(5)).mean() >= 0.6          # approximate, mostly itself
    a, sc = search_excluding(flat, x[:5], 10, [np.zeros(0, np.int64)] * 5)
    assert (a[:, 0] == np.arange(5)).all()
    # Scores are cosines whatever metric the index uses (unit vectors are indexed with L2).
    np.testing.assert_allclose(sc[:, 0], 1.0, atol=1e-5)
    np.testing.assert_allclose(sc[0, 1], float(x[0] @ x[a[0, 1]]), atol=1e-5)
    with pytest.raises(FaissIndexError, match="lists for 500 items"):
        build_index(x, "IVF1024,Flat")
    with pytest.raises(FaissIndexError, match="factory string"):
        build_index(x, "NotAnIndex")


def test_item_to_item_and_code_prefix_baselines():
    pop = np.array([5, 1, 0, 3])
    i2i = ItemToItem([0, 0], [1, 2], [0.5, 2.0], 4, pop, recent=2)
    s = i2i.scores([np.array([0])])
    assert torch.argsort(s[0], descending=True)[:2].tolist() == [2, 1]
    rq = np.array([[0, 1], [0, 1], [0, 2], [1, 0]])
    cp = CodePrefix(rq, 3, pop, recent=2).scores([np.array([1])])
    # Item 0 shares levels 1-2 with item 1 (2), item 2 level 1 only (1), item 3 nothing.
    assert cp[0, 0] > cp[0, 2] > cp[0, 3]


# --------------------------------------------------------------------------- real training
def _world(n=240, clusters=8, users=320, seed=0):
    rng = np.random.default_rng(seed)
    cl = np.arange(n) % clusters
    cold = np.arange(n) >= n - clusters * 2            # two cold items per cluster
    seqs = []
    for _ in range(users):
        c = rng.integers(0, clusters)
        seqs.append(rng.choice(np.flatnonzero((cl == c) & ~cold), rng.integers(6, 20)))
    rq = [[int(c), int(rng.integers(0, 4))] for c in cl]
    vq = [list(rng.choice(np.flatnonzero(cl == c), 4)) for c in cl]
    pop = np.bincount(np.concatenate([s[:-1] for s in seqs]), minlength=n)
    return ItemFeatures.build(n, np.arange(n), rq, vq, clusters, pop), seqs, cl, cold


def test_sampled_softmax_batch_never_samples_cold_items_and_corrects_for_popularity():
    feats, seqs, _, cold = _world()
    stride = lookup_rows(4, 10, 64)
    b = make_batch(seqs[:4], feats, ["rq_0", "rq_1", "vq"], 10, 64, stride,
                   np.random.default_rng(0))
    ids = b.uniq[b.valid].numpy()
    assert not cold[ids].any() and b.kjt.stride() == stride
    # Targets are the next items of real inputs.
    has = b.tgt_idx >= 0
    assert int(has.sum()) == sum(min(len(s), 11) - 1 for s in seqs[:4])
    assert (b.logq[b.valid] <= 0).all()
    model = Retriever("codes", feats, 16, 10, 1, 1, 0.0, 0.1)
    loss, n = model(b)
    assert torch.isfinite(loss) and int(n) == int(has.sum())


def test_a_small_catalogue_caps_the_lookup_and_padding_rows_leave_the_loss_unchanged():
    feats, seqs, _, _ = _world()
    wide = lookup_rows(8, 20, 64)
    narrow = lookup_rows(8, 20, 64, feats.n_items)
    assert (wide, narrow) == (8 * 21 + 64 + 1, 8 * 21 + 64 + 1)   # 232 rows fit 240 items
    assert lookup_rows(64, 50, 256, feats.n_items) == feats.n_items + 1
    torch.manual_seed(0)
    model = Retriever("codes", feats, 16, 20, 1, 1, 0.0, 0.1).eval()
    losses = []
    for stride in (feats.n_items + 1, 3 * feats.n_items):
        b = make_batch(seqs[:32], feats, model.names, 20, 64, stride, np.random.default_rng(1))
        assert int(b.valid.sum()) <= feats.n_items
        losses.append(model(b)[0].item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


@pytest.mark.parametrize("repr_", ["codes", "ids"])
def test_two_rank_training_learns_and_a_cold_item_is_retrieved_through_its_codes(tmp_path,
                                                                                 repr_):
    from recsys.retrieval_data import RetrievalData
    from recsys.retrieval_train import RetrievalJob, save_features, train_retriever

    feats, seqs, cl, cold = _world()
    train = [s[:-1] for s in seqs]
    valid = Queries.build(np.arange(len(seqs)), [s[:-1] for s in train], [s[-1:] for s in train])
    data = RetrievalData(feats.n_items, train, valid, valid, np.arange(len(seqs)), train,
                         feats.popularity, cold)
    data.valid.save(tmp_path / "valid.npz")
    job = RetrievalJob(repr_, str(tmp_path / repr_), save_features(feats, tmp_path / "f.npz"),
                       "", data.save_sequences(tmp_path / "s.npz"), str(tmp_path / "valid.npz"),
                       dim=16, max_len=10, blocks=1, heads=1, dropout=0.1, temperature=0.1,
                       sampled=32, micro_batch=32, epochs=40, patience=0, valid_every=10,
                       max_steps=60, sparse_lr=0.1, dense_lr=3e-3, init_scale=0.1, seed=0,
                       world=2)
    model, result = train_retriever(job, 2, quiet=True)
    assert result["world"] == 2 and result["steps"] == 60
    assert result["loss_curve"][-1] < result["loss_curve"][0]
    first, best = result["valid_curve"][0][1], result["best_valid"]
    assert best > first
    tower = Tower(model, feats)
    if repr_ != "codes":
        return
    # A user whose history is one cluster: a cold item of that cluster (never trained on, not
    # even as a negative) is near the top for the codes tower (8 clusters of 30 items).
    c = 3
    hist = [np.flatnonzero((cl == c) & ~cold)[:8]]
    scores = tower.scores(hist)[0]
    scores[hist[0]] = -torch.inf
    order = torch.argsort(scores, descending=True).numpy()
    cold_c = np.flatnonzero((cl == c) & cold)
    ranks = [int(np.flatnonzero(order == i)[0]) for i in cold_c]
    assert max(ranks) < 40, ranks


def test_a_saved_retriever_loads_the_same_and_a_pickle_is_refused(tmp_path):
    import pickle

    from recsys.retrieval_train import RetrievalJob
    from recsys.saved import ModelFormatError, load_retriever, save_retriever

    feats, seqs, _, _ = _world(n=40, clusters=4, users=10)
    torch.manual_seed(0)
    model = Retriever("ids+codes", feats, 8, 6, 1, 1, 0.0, 0.1).eval()
    job = RetrievalJob("ids+codes", "", "", "", "", "", dim=8, max_len=6, blocks=1, heads=1,
                       dropout=0.0, temperature=0.1, sampled=8, micro_batch=4, epochs=1,
                       patience=0, valid_every=0, max_steps=1, sparse_lr=0.1, dense_lr=1e-3,
                       init_scale=0.1, seed=0)
    folder = save_retriever(model, job, feats, tmp_path / "r")
    loaded, feats2 = load_retriever(folder)
    np.testing.assert_array_equal(feats2.rq, feats.rq)
    torch.testing.assert_close(Tower(loaded, feats2).scores(seqs[:3]),
                               Tower(model, feats).scores(seqs[:3]))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("weights.safetensors", "features.npz"):
        bad = tmp_path / f"bad_{name}"
        import shutil

        shutil.copytree(folder, bad)
        (bad / name).write_bytes(pickle.dumps(Payload()))
        with pytest.raises(ModelFormatError, match="never"):
            load_retriever(bad)
    assert not marker.exists()
