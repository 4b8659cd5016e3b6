"""The TorchRec ranker: feature spec, batches, the model, real multi-process DMP training
(gloo, 1 and 2 ranks), checkpoints and resume, metrics."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from recsys import checkpoint as ck
from recsys.config import ModelConfig, TrainConfig
from recsys.data import ShardPlan, eval_batches, table_rows, to_batch, train_batches
from recsys.features import ARMS, DEDUP_MAX_ROWS, FeatureSpecError, build_spec
from recsys.metrics import auc, gauc, logloss, normalized_entropy
from recsys.runner import load_trained, make_job, prepare_out_dir, train_arm
from recsys.job import TrainError
from recsys.launch import launch
from recsys.train import initial_state
from recsys.testing import frozen_table, random_examples, write_examples

REPO = Path(__file__).resolve().parents[1]

SPEC_ARGS = dict(dim=8, history_len=5, levels=2, codes_per_level=8, n_items=50, n_users=20,
                 frozen_dim=4, vq_k=3, match_thresholds=(0.3, 0.8))


def spec(arm="codes"):
    return build_spec(arm, **SPEC_ARGS)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranker")
    np.save(root / "frozen.npy", frozen_table())
    return (write_examples(root / "train", random_examples(1280, seed=1)),
            write_examples(root / "eval", random_examples(300, seed=2)), root)


def train_cfg(**kw) -> TrainConfig:
    # No weight averaging unless a test asks for it: most tests check the training steps.
    base = dict(model=ModelConfig(dim=8, attention_dim=8, cross_rank=8, mlp=[16]), ranks=1,
                batch_size=64, epochs=1, sparse_lr=0.1, dense_lr=5e-3, register=False,
                average=0.0)
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------- spec and batches


def test_every_arm_has_its_tables_and_bad_arms_fail_clearly():
    tables = {a: {t.name for t in spec(a).tables} for a in ARMS}
    assert tables["id_only"] == tables["frozen_mm"] == {"user", "item"}
    assert tables["codes"] == tables["codes_raw"] == {"user", "item", "rq_l1", "rq_l2", "vq"}
    assert tables["frozen_aligned"] == {"user", "item"}
    assert [(spec(a).frozen_source, spec(a).frozen_dim) for a in
            ("frozen_mm", "frozen_aligned", "codes+frozen", "codes")] == [
        ("raw", 4), ("aligned", 4), ("raw", 4), ("", 0)]
    assert spec("codes_raw").table("rq_l1").num_embeddings == 9   # + the "no code" row
    with pytest.raises(FeatureSpecError, match="unknown arm"):
        build_spec("codez", **SPEC_ARGS)
    with pytest.raises(FeatureSpecError, match="frozen embedding"):
        build_spec("frozen_mm", **{**SPEC_ARGS, "frozen_dim": 0})
    with pytest.raises(FeatureSpecError, match="similarity thresholds"):
        build_spec("frozen_aligned", **{**SPEC_ARGS, "match_thresholds": ()})


def test_the_2x2_arms_have_inputs_of_one_width_and_tables_on_one_scale():
    from recsys.model import build_ranker

    cfg = ModelConfig(dim=8, attention_dim=8, cross_rank=8, mlp=[16], init_scale=0.05)
    torch.manual_seed(0)
    widths = {}
    for arm in ("frozen_mm", "frozen_aligned", "codes", "codes_raw"):
        m = build_ranker(spec(arm), cfg)
        widths[arm] = m.over.cross.v[0].in_features
        for name, p in m.sparse.named_parameters():
            assert abs(float(p.detach().std()) - 0.05) < 0.02, name
    assert len(set(widths.values())) == 1, widths


def test_the_frozen_arms_pool_the_history_items_similar_to_the_target():
    from recsys.model import build_ranker

    s = spec("frozen_aligned")
    m = build_ranker(s, ModelConfig(dim=8, attention_dim=8, cross_rank=8, mlp=[16]),
                     frozen_table=torch.eye(50, 4)[torch.arange(50) % 4]).eval()   # no dropout
    seen = {}
    m.over.cross.register_forward_hook(lambda mod, inp, out: seen.setdefault("x", inp[0]))
    b = to_batch(random_examples(1, seed=0), s)
    b.item_ids[:] = 4                                   # target vector e0
    b.hist_ids[0, :3] = torch.tensor([8, 1, 12])        # e0, e1, e0
    b.hist_mask[0] = torch.tensor([1.0, 1, 1, 0, 0])
    m(b)
    d, w = 8, 8 * 3                                     # item width: id + 2 frozen slots
    pooled = seen["x"][0, d + 2 * w + 1: d + 4 * w + 1].view(2, w)
    with torch.no_grad():
        hist = torch.cat([m.sparse(b)["hist_item_id"],
                          m.over.frozen(m.over.frozen_table[b.hist_ids])], dim=2)[0]
    # Cosine 1 with items 8 and 12 (both e0), 0 with item 1: both pools average items 8, 12.
    torch.testing.assert_close(pooled[0], (hist[0] + hist[2]) / 2)
    torch.testing.assert_close(pooled[1], (hist[0] + hist[2]) / 2)
    # An item without a content vector (a zero row) matches nothing, whatever the thresholds.
    m.over.thresholds.fill_(-1.0)
    m.over.frozen_table[12] = 0.0
    seen.clear()
    m(b)
    pooled = seen["x"][0, d + 2 * w + 1: d + 4 * w + 1].view(2, w)
    with torch.no_grad():
        hist = torch.cat([m.sparse(b)["hist_item_id"],
                          m.over.frozen(m.over.frozen_table[b.hist_ids])], dim=2)[0]
    torch.testing.assert_close(pooled[0], (hist[0] + hist[1]) / 2)


def test_batch_holds_the_right_ids_masks_and_prefix_matches():
    t = random_examples(6, seed=3)
    s = dataclasses.replace(spec("codes"), dedup_ids=False)     # one id per occurrence
    b = to_batch(t, s)
    seq = b.seq.to_dict()
    np.testing.assert_array_equal(seq["item_id"].values().numpy(),
                                  table_rows(t.column("item_id").to_numpy(), 50, True))
    hist = t.column("hist_item_ids").to_pylist()
    np.testing.assert_array_equal(seq["hist_item_id"].lengths().numpy(), [len(h) for h in hist])
    np.testing.assert_array_equal(b.hist_mask.sum(1).numpy(), [len(h) for h in hist])
    rq = t.column("rq").to_pylist()
    hrq = t.column("hist_rq").to_pylist()
    for i in range(6):
        want1 = [float(c[0] == rq[i][0]) for c in hrq[i]]
        want2 = [float(c[0] == rq[i][0] and c[1] == rq[i][1]) for c in hrq[i]]
        assert b.prefix_mask[i, :len(hrq[i]), 0].tolist() == want1
        assert b.prefix_mask[i, :len(hrq[i]), 1].tolist() == want2
    np.testing.assert_array_equal(seq["rq_l2"].values().numpy(), [c[1] for c in rq])
    raw = to_batch(t, dataclasses.replace(spec("codes_raw"), dedup_ids=False)).seq.to_dict()
    np.testing.assert_array_equal(raw["rq_l1"].values().numpy(),
                                  [c[0] for c in t.column("rq_raw").to_pylist()])
    # A missing code (-1) goes to the reserved last row.
    t2 = t.set_column(t.schema.get_field_index("rq"), "rq",
                      pa.array([[-1, 3]] * 6, t.schema.field("rq").type))
    assert set(to_batch(t2, s).seq.to_dict()["rq_l1"].values().tolist()) == {8}


@pytest.mark.parametrize("n_items", [50, 100_000])
def test_a_deduplicated_batch_holds_each_id_once_and_gathers_every_example_back(n_items):
    # A 50-row item table is deduplicated, a larger one than DEDUP_MAX_ROWS keeps its layout
    # (the code tables are small in both).
    t = random_examples(40, seed=5)
    s = build_spec("codes", **{**SPEC_ARGS, "n_items": n_items})
    full = to_batch(t, dataclasses.replace(s, dedup_ids=False)).seq.to_dict()
    b = to_batch(t, s)
    seq = b.seq.to_dict()
    N = s.history_len
    assert b.seq_index.shape == (len(s.dedup_tables), 40, 1 + N)
    for tab in s.sequence_tables:
        cand, hist = tab.features
        if tab.name == "item" and n_items > DEDUP_MAX_ROWS:
            assert not s.dedups(tab)
            torch.testing.assert_close(seq[cand].values(), full[cand].values())
            torch.testing.assert_close(seq[hist].lengths(), full[hist].lengths())
            continue
        uniq = seq[cand].values()
        assert seq[hist].values().numel() == 0
        assert uniq.tolist() == sorted(set(full[cand].values().tolist())
                                       | set(full[hist].values().tolist()))
        padded = torch.cat([uniq, torch.tensor([-1])])[b.seq_index[s.dedup_tables.index(tab)]]
        torch.testing.assert_close(padded[:, 0], full[cand].values())
        jt = full[hist]
        want = torch.ops.fbgemm.jagged_to_padded_dense(
            jt.values().float()[:, None], [jt.offsets()], [N], -1.0)[..., 0].long()
        torch.testing.assert_close(padded[:, 1:], want)


def test_hashed_ids_are_spread_over_the_table_with_modulo_collisions():
    rows = 1000
    ids = np.arange(3 * rows)
    r = table_rows(ids, rows, hashed=True)
    assert sorted(r[:rows].tolist()) == list(range(rows))     # a bijection of [0, rows)
    np.testing.assert_array_equal(r[rows:], np.tile(r[:rows], 2))   # ids = mod rows share
    # The 100 smallest ids (often the most popular) land in both halves of a row-wise split.
    assert 30 < (r[:100] < rows // 2).sum() < 70
    # Codes are not hashed: a missing (-1) or out-of-range code takes the reserved last row.
    np.testing.assert_array_equal(table_rows(np.array([0, 5, -1, 9]), 9, hashed=False),
                                  [0, 5, 8, 8])


def test_global_batches_do_not_depend_on_the_number_of_ranks(data):
    train, _, _ = data
    s = spec("id_only")
    one = [b.labels for b in train_batches(train, s, ShardPlan(1280, 64, 1), 0, 1)]
    two = [list(train_batches(train, s, ShardPlan(1280, 32, 2), r, 1)) for r in (0, 1)]
    assert len(one) == len(two[0]) == len(two[1]) == 20
    for g, (a, b) in zip(one, zip(*two)):
        torch.testing.assert_close(g, torch.cat([a.labels, b.labels]))
    both = [b.item_ids for b in train_batches(train, s, ShardPlan(1280, 64, 1), 0, 2)]
    resumed = [b.item_ids for b in train_batches(train, s, ShardPlan(1280, 64, 1), 0, 2, 27)]
    assert len(resumed) == 13
    torch.testing.assert_close(resumed[0], both[27])
    # Each epoch reads every row once, in its own order; another seed, another order.
    first, second = torch.cat(both[:20]), torch.cat(both[20:])
    assert sorted(first.tolist()) == sorted(second.tolist())
    assert not torch.equal(first, second)
    other = torch.cat([b.item_ids for b in train_batches(train, s, ShardPlan(1280, 64, 1),
                                                         0, 1, seed=1)])
    assert not torch.equal(first, other)


def test_eval_batches_score_every_row_once_and_pad_evenly(data):
    _, ev, _ = data
    s = spec("id_only")
    plan = ShardPlan(300, 64, 2)
    got = [list(eval_batches(ev, s, plan, r)) for r in (0, 1)]
    assert len(got[0]) == len(got[1]) == plan.eval_steps == 3
    rows = sum(t.num_rows for g in got for _, t in g)
    assert rows == 300
    assert all(b.labels.shape[0] == 64 for g in got for b, _ in g)


@pytest.mark.parametrize("n_items", [50, 100_000])
def test_plain_pytorch_lookups_compute_the_same_model_as_torchrec(n_items):
    from recsys.model import PlainSparse, Ranker, build_ranker

    # TorchRec's batches look a small table's distinct ids up once and gather the rows back;
    # the plain model looks up every occurrence. Same logits, same loss, same gradient on
    # every row.
    s = build_spec("codes+frozen", **{**SPEC_ARGS, "n_items": n_items})
    ps = dataclasses.replace(s, dedup_ids=False)
    cfg = ModelConfig(dim=8, attention_dim=8, cross_rank=8, mlp=[16])
    torch.manual_seed(0)
    tr = build_ranker(s, cfg)
    plain = Ranker(ps, cfg, PlainSparse(ps))
    state = tr.state_dict()
    mapped = {k.replace("sparse.ec.embeddings.", "sparse.emb.")
               .replace("sparse.ebc.embedding_bags.", "sparse.bags."): v for k, v in state.items()}
    plain.load_state_dict(mapped)
    t = random_examples(16, seed=4)
    tr.eval(), plain.eval()                          # no dropout
    out_tr, out_plain = tr(to_batch(t, s)), plain(to_batch(t, ps))
    torch.testing.assert_close(out_tr[1][1], out_plain[1][1])
    out_tr[0].backward()
    out_plain[0].backward()
    grads = {n: p.grad for n, p in tr.sparse.named_parameters()}
    for n, p in plain.sparse.named_parameters():
        key = n.replace("emb.", "ec.embeddings.").replace("bags.", "ebc.embedding_bags.")
        torch.testing.assert_close(grads[key], p.grad.to_dense())
    with pytest.raises(ValueError, match="dedup_ids"):
        PlainSparse(s)


@pytest.mark.parametrize("bias", [True, False])
def test_the_explicit_term_is_biases_plus_a_dot_product(bias):
    """With ``model.bias`` the first value of the user's vector and of the target's summed
    parts are biases, the rest their dot product; without it, the whole vectors' dot."""
    from recsys.model import build_ranker

    s = spec("codes")
    cfg = ModelConfig(dim=8, attention_dim=8, cross_rank=8, mlp=[16], bias=bias)
    torch.manual_seed(0)
    model = build_ranker(s, cfg).eval()
    with torch.no_grad():                             # the deep part's output is 0
        model.over.mlp[-1].weight.zero_()
        model.over.mlp[-1].bias.zero_()
    b = to_batch(random_examples(16, seed=5), s)
    emb = model.sparse(b)
    u = emb["user_id"]
    i = emb["item_id"] + sum(emb[p] for p in s.item_parts[1:])
    want = (u[:, 1:] * i[:, 1:]).sum(1) + u[:, 0] + i[:, 0] if bias else (u * i).sum(1)
    torch.testing.assert_close(model.over(emb, b), want)


def test_older_jobs_and_models_keep_the_model_they_were_trained_with():
    """A job file or saved model from before ``bias`` and ``detach_history`` loads with both
    off, as it was trained, though a new run has ``bias`` on by default."""
    from recsys.job import model_config

    assert (ModelConfig().bias, ModelConfig().detach_history) == (True, False)
    old = dataclasses.asdict(ModelConfig())
    del old["bias"], old["detach_history"]
    assert (model_config(old).bias, model_config(old).detach_history) == (False, False)
    on = {**old, "bias": True, "detach_history": True}
    assert (model_config(on).bias, model_config(on).detach_history) == (True, True)
    assert model_config(dataclasses.asdict(ModelConfig())) == ModelConfig()


def test_dropout_keeps_each_value_with_probability_1_minus_p_and_rescales():
    from recsys.model import Dropout

    d = Dropout(0.3)
    x = torch.ones(400, 500)
    y = d(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7))
    assert not torch.equal(kept, d(x) != 0)              # a fresh mask per call
    d.eval()
    assert d(x) is x
    with pytest.raises(ValueError, match="dropout"):
        Dropout(1.0)


# --------------------------------------------------------------------------- metrics


def test_auc_gauc_logloss_ne_match_hand_computed_values():
    y = [1, 0, 1, 0, 1, 0]
    s = [0.9, 0.8, 0.7, 0.7, 0.2, 0.1]
    # positive/negative pairs: (0.9 > all 3), (0.7: > 0.1, tie 0.7, < 0.8) = 1.5, (0.2: > 0.1)
    assert auc(y, s) == pytest.approx((3 + 1.5 + 1) / 9)
    users = ["a", "a", "a", "b", "b", "c"]
    y = [1, 0, 0, 1, 0, 1]
    s = [0.9, 0.5, 0.95, 0.2, 0.3, 0.5]
    # a: 3 impressions, AUC 1/2; b: 2 impressions, AUC 0; c: one class only, left out.
    g, used, skipped = gauc(users, y, s)
    assert (g, used, skipped) == (pytest.approx((3 * 0.5 + 2 * 0.0) / 5), 2, 1)
    p = [0.8, 0.4]
    ll = -(np.log(0.8) + np.log(0.6)) / 2
    assert logloss([1, 0], p) == pytest.approx(ll)
    assert normalized_entropy([1, 0], p) == pytest.approx(ll / np.log(2))
    assert np.isnan(auc([1, 1], [0.2, 0.3]))


# --------------------------------------------------------------------------- training


def _job(data, arm, cfg, out):
    train, ev, root = data
    return make_job(spec(arm), cfg, train, ev, out, str(root / "frozen.npy"))


@pytest.mark.parametrize("detach_history", [True, False])
def test_a_step_updates_exactly_the_code_rows_in_the_batch(data, tmp_path, detach_history):
    """One DMP step with the fused row-wise Adagrad changes the embedding rows of the ids and
    codes in the batch (codes are learned by the ranking loss) and leaves every other row. With
    ``detach_history`` (the default) a row that only appears in histories keeps its value: the
    history features read it without training it."""
    cfg = train_cfg(max_steps=1, model=dataclasses.replace(
        train_cfg().model, detach_history=detach_history))
    job = _job(data, "codes", cfg, tmp_path / "one_step")
    launch(job, 1, quiet=True)
    before = initial_state(job)
    after = load_trained(tmp_path / "one_step").state_dict()
    first_b = next(train_batches(job.train_files, spec("codes"), ShardPlan(1280, 64, 1), 0, 1,
                                  seed=job.seed))
    b = first_b
    seq, pooled = b.seq.to_dict(), b.pooled.to_dict()
    s = spec("codes")
    # Each table's ids in the batch: (as a target, anywhere). A deduplicated table's target
    # feature holds its distinct ids, and the batch's index says which are targets.
    where: dict = {t.features[0]: t for t in s.dedup_tables}
    ids = {}
    for t in s.sequence_tables:
        cand, hist = t.features
        if cand in where:
            rows = seq[cand].values()
            k = list(where).index(cand)
            ids[t.name] = (set(rows[b.seq_index[k][:, 0]].tolist()), set(rows.tolist()))
        else:
            target = set(seq[cand].values().tolist())
            ids[t.name] = (target, target | set(seq[hist].values().tolist()))
    for t in s.bag_tables:
        every = set(pooled[t.features[0]].values().tolist())
        ids[t.name] = (every, every)
    history_only = 0
    for table, (target, anywhere) in ids.items():
        key = next(k for k in before if k.endswith(f".{table}.weight"))
        in_batch = target if detach_history else anywhere
        history_only += len(anywhere - target)
        changed = set(torch.nonzero((after[key] != before[key]).any(1)).flatten().tolist())
        assert changed == in_batch, table
    assert history_only > 0           # the batch has rows that only its histories read
    assert not torch.equal(before["over.mlp.0.weight"], after["over.mlp.0.weight"])


def test_ranks_forked_from_the_rank_server_train_as_fresh_interpreters_do(data, tmp_path):
    """The default local launch forks each rank from a server that imported torch and
    TorchRec once; a fresh ``python -m recsys.train`` per rank (``preloaded=False``) computes
    the same steps, to the float."""
    from recsys.launch import rank_server

    cfg = train_cfg(max_steps=6, ranks=2)
    forked = launch(_job(data, "codes", cfg, tmp_path / "forked"), 2, quiet=True)
    fresh = launch(_job(data, "codes", cfg, tmp_path / "fresh"), 2, quiet=True,
                   preloaded=False)
    assert rank_server() is not None
    assert forked["world"] == fresh["world"] == 2
    assert forked["loss_curve"] == fresh["loss_curve"] and len(forked["loss_curve"]) == 6
    # Each forked rank logged to its own file, as a subprocess does.
    assert (tmp_path / "forked" / "rank1.log").stat().st_size > 0
    # A launching process exits without multiprocessing's leaked-semaphore warning (tqdm's
    # default lock in a rank that leaves with os._exit would be one).
    p = subprocess.run([sys.executable, "-c", "from recsys.job import TrainJob; from "
                        "recsys.launch import launch; launch(TrainJob.load("
                        f"{str(tmp_path / 'forked' / 'job.json')!r}), 2, quiet=True)"],
                       capture_output=True, text=True, cwd=str(REPO))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "leaked" not in p.stderr, p.stderr[-2000:]


def test_a_launch_without_ranks_or_without_a_result_is_a_clear_error(data, tmp_path,
                                                                      monkeypatch):
    job = _job(data, "codes", train_cfg(max_steps=1), tmp_path / "none")
    with pytest.raises(TrainError, match="ranks must be at least 1, got 0"):
        launch(job, 0, quiet=True)
    # Ranks that exit 0 without writing result.json (here: a module that does nothing).
    (tmp_path / "noop_rank.py").write_text("def main(argv=None):\n    pass\n\n\n"
                                           "if __name__ == '__main__':\n    main()\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(TrainError, match="exited without writing .*result.json"):
        launch(job, 1, quiet=True, module="noop_rank", preloaded=False)


def test_two_ranks_give_the_loss_curve_of_one_rank(data, tmp_path):
    # Each rank draws its own dropout masks: only a model without dropout computes the same
    # steps on 1 and 2 ranks.
    # The weights scored are the average (train.average), kept per rank on its own shards.
    model = ModelConfig(dim=8, attention_dim=8, cross_rank=8, mlp=[16], dropout=0.0)
    one = train_arm(spec("codes"), train_cfg(batch_size=64, ranks=1, model=model,
                                             average=0.9), data[0],
                    data[1], tmp_path / "r1", quiet=True)
    two = train_arm(spec("codes"), train_cfg(batch_size=64, ranks=2, launcher="torchrun",
                                             model=model, average=0.9),
                    data[0], data[1], tmp_path / "r2", quiet=True)
    c1, c2 = np.asarray(one.result["loss_curve"]), np.asarray(two.result["loss_curve"])
    assert len(c1) == len(c2) == 20 and c1[-1] < c1[0]
    np.testing.assert_allclose(c1, c2, atol=1e-4)
    assert two.result["world"] == 2
    plan = two.result["plan"]
    assert {r for p in plan.values() for r in p["ranks"]} == {0, 1}   # both ranks hold tables
    assert {p["sharding"] for p in plan.values()} == {"table_wise", "row_wise"}, plan
    # One rank: whole tables (row-wise would only bucketize every id).
    assert {p["sharding"] for p in one.result["plan"].values()} == {"table_wise"}
    a = one.predictions.sort_by([("ts", "ascending")]).column("score").to_numpy()
    b = two.predictions.sort_by([("ts", "ascending")]).column("score").to_numpy()
    assert len(a) == len(b) == 300
    np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("resume_ranks", [2, 1])
def test_a_killed_run_resumes_from_its_checkpoint_to_the_uninterrupted_result(
        data, tmp_path, monkeypatch, resume_ranks):
    # Validation every 6 steps (patience too large to stop): the checkpoints carry the early
    # stopping state, the best weights and the weight average, and the final model is the best
    # validation's average. The checkpoint of 2 ranks also resumes on 1 (no dropout: each rank
    # draws its own masks).
    model = ModelConfig(dim=8, attention_dim=8, cross_rank=8, mlp=[16], dropout=0.0)
    cfg = train_cfg(ranks=2, batch_size=64, epochs=2, checkpoint_every=8, valid_every=6,
                    patience=50, model=model, average=0.8)
    full = train_arm(spec("codes"), cfg, data[0], data[1], tmp_path / "full", quiet=True,
                     valid_files=data[1])
    out = tmp_path / "killed"
    monkeypatch.setenv("QARM_TEST_DIE_AFTER_STEPS", "21")
    with pytest.raises(TrainError, match="exited"):
        train_arm(spec("codes"), cfg, data[0], data[1], out, quiet=True, valid_files=data[1])
    monkeypatch.delenv("QARM_TEST_DIE_AFTER_STEPS")
    assert ck.latest(out / "checkpoints").name == "step_16"
    assert ck.read_meta(out / "checkpoints" / "step_16")["world"] == 2
    # Each rank wrote only its own shards (DCP: one data file per rank) plus DCP's metadata.
    assert sorted(f.name for f in (out / "checkpoints" / "step_16").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]
    assert not (out / "model" / "meta.json").exists()
    assert ck.read_meta(out / "checkpoints" / "step_16")["average"] == "average_16"
    resumed = train_arm(spec("codes"), dataclasses.replace(cfg, ranks=resume_ranks), data[0],
                        data[1], out, quiet=True, valid_files=data[1])
    assert resumed.resumed and resumed.result["resumed_from"] == 16
    assert resumed.result["world"] == resume_ranks
    np.testing.assert_allclose(resumed.result["loss_curve"], full.result["loss_curve"][16:],
                               atol=1e-5)
    np.testing.assert_allclose(resumed.result["valid_curve"], full.result["valid_curve"],
                               atol=1e-6)
    assert resumed.result["best_step"] == full.result["best_step"]
    a, b = load_trained(tmp_path / "full").state_dict(), load_trained(out).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=k)

    def scored_auc(res):
        p = res.predictions.to_pandas()
        return auc(p.label.to_numpy(), p.score.to_numpy())

    assert round(scored_auc(resumed), 4) == round(scored_auc(full), 4)


def test_early_stopping_keeps_the_weights_of_the_best_validation(data, tmp_path):
    cfg = train_cfg(batch_size=64, epochs=30, valid_every=4, patience=2)
    res = train_arm(spec("codes"), cfg, data[0], data[1], tmp_path / "es", quiet=True,
                    valid_files=data[1])
    r = res.result
    assert r["stopped_early"] and r["steps"] < r["max_steps"] == 20 * 30
    values = [v for _, v in r["valid_curve"]]
    assert r["best_valid"] == max(values) and len(values) == r["steps"] // 4
    # No improvement over the last `patience` validations; the model scored is the best one.
    assert max(values[-2:]) <= r["best_valid"]
    p = res.predictions.to_pandas()
    valid = p[p.part == p.part.iloc[0]]            # data[1] is scored as valid and as eval
    assert auc(valid.label[:300], valid.score[:300]) == pytest.approx(r["best_valid"], abs=1e-6)


def test_a_changed_job_starts_clean_instead_of_resuming(data, tmp_path):
    cfg = train_cfg(max_steps=3)
    job = _job(data, "id_only", cfg, tmp_path / "x")
    (tmp_path / "x" / "checkpoints" / "step_2").mkdir(parents=True)
    job.save(tmp_path / "x" / "job.json")
    assert prepare_out_dir(job) is True
    other = dataclasses.replace(job, sparse_lr=0.5)
    assert prepare_out_dir(other) is False and not (tmp_path / "x").exists()


def test_a_failing_rank_reports_its_error(data, tmp_path):
    cfg = train_cfg(batch_size=4096)
    with pytest.raises(TrainError, match="no global batch"):
        train_arm(spec("id_only"), cfg, data[0], data[1], tmp_path / "big", quiet=True)


def test_a_checkpoint_folder_is_complete_only_with_its_meta_and_fits_only_its_model(tmp_path):
    state = {"model": {"w": torch.arange(12.0).reshape(4, 3), "b": torch.ones(2)}}
    ck.save(tmp_path / "step_3", state, rank=0, meta={"step": 3, "world": 1})
    (tmp_path / "step_9").mkdir()                      # a writer killed before its meta.json
    assert ck.latest(tmp_path) == tmp_path / "step_3"
    got = {"model": {"w": torch.zeros(4, 3), "b": torch.zeros(2)}}
    assert ck.load(tmp_path / "step_3", got)["step"] == 3
    torch.testing.assert_close(got["model"]["w"], state["model"]["w"])
    with pytest.raises(ck.CheckpointError, match="no meta.json"):
        ck.load(tmp_path / "step_9", got)
    with pytest.raises(ck.CheckpointError, match="different model"):
        ck.load(tmp_path / "step_3", {"model": {"w": torch.zeros(5, 3)}})


def test_the_cascade_arm_reads_its_frozen_table_and_never_trains_it(data, tmp_path):
    res = train_arm(spec("frozen_mm"), train_cfg(max_steps=3), data[0], data[1], tmp_path / "f",
                    quiet=True, frozen_table=str(data[2] / "frozen.npy"))
    model = load_trained(res.out_dir)
    np.testing.assert_array_equal(model.over.frozen_table.numpy(), frozen_table())
    with pytest.raises(FeatureSpecError, match="frozen content table"):
        train_arm(spec("frozen_mm"), train_cfg(max_steps=3), data[0], data[1], tmp_path / "g")


def test_predicted_tags_are_a_bag_feature_that_trains_and_round_trips(data, tmp_path):
    from recsys.features import spec_for_examples

    vocab = tuple(f"tag{i}" for i in range(10))            # random_examples: 8 codes + 2
    s = build_spec("codes", **SPEC_ARGS, pred_tag_vocab=vocab, mean_pred_tags=2.0)
    assert s.table("pred_tags").num_embeddings == 11 and s.table("pred_tags").kind == "bag"
    assert "pred_tags" in s.columns() and "pred_tags" not in spec("codes").columns()
    t = random_examples(6, seed=3)
    bag = to_batch(t, s).pooled.to_dict()["pred_tags"]
    np.testing.assert_array_equal(bag.lengths().numpy(), [2] * 6)
    np.testing.assert_array_equal(bag.values().numpy(),
                                  np.concatenate(t.column("pred_tags").to_pylist()))
    res = train_arm(s, train_cfg(max_steps=2), data[0], data[1], tmp_path / "tags", quiet=True)
    model = load_trained(res.out_dir)
    assert model.spec.pred_tag_vocab == vocab
    assert model.over.cross.v[0].in_features == build_ranker_width(spec("codes")) + 8
    # Without a tagger the examples carry no tags: asking for them is a clear error.
    facts = dataclasses.replace(_facts(), pred_tag_vocab=())
    with pytest.raises(FeatureSpecError, match="pretrain.enabled"):
        spec_for_examples("codes", ModelConfig(pred_tags=True), facts)
    assert spec_for_examples("codes", ModelConfig(pred_tags=True), dataclasses.replace(
        facts, pred_tag_vocab=vocab)).pred_tag_vocab == vocab


def build_ranker_width(s) -> int:
    from recsys.model import build_ranker

    return build_ranker(s, ModelConfig(dim=8, attention_dim=8, cross_rank=8, mlp=[16])
                        ).over.cross.v[0].in_features


def _facts():
    from feature_store.facts import ExamplesFacts

    return ExamplesFacts(implicit_negatives=False, levels=2, n_items=50, n_users=20,
                         split_mode="global", history_len=5, raw_codes=False, frozen=False,
                         frozen_dim=0, frozen_embeddings=None, codes_per_level=8,
                         mean_history=3.0, mean_vq=3.0, codebook_version="c",
                         encoder_version="e")


# --------------------------------------------------------------------------- runs at once


def test_concurrent_runs_fill_the_cores_without_oversubscribing_them():
    from recsys.launch import concurrent_runs, usable_cores

    cores = usable_cores()
    assert concurrent_runs(0, ranks=1, threads=1) == cores
    assert concurrent_runs(0, ranks=2, threads=1) == max(1, cores // 2)
    assert concurrent_runs(0, ranks=cores + 1, threads=1) == 1
    assert concurrent_runs(0, 1, 1, device="cuda") == 1
    assert concurrent_runs(0, 1, 1, launcher="torchrun") == 1
    assert concurrent_runs(3, ranks=2, threads=4) == 3
    with pytest.raises(ValueError, match="0 \\(auto\\) or positive"):
        concurrent_runs(-1, 1, 1)


def test_runs_at_once_keep_their_order_and_a_failure_is_raised():
    import threading
    import time

    from recsys.launch import run_concurrently

    # Three at a time: each group of three must meet at the barrier (it would time out if
    # they ran one after another); results come back in the items' order.
    barrier = threading.Barrier(3, timeout=20)

    def square(x):
        barrier.wait()
        time.sleep(0.01 * (5 - x))
        return x * x
    finished = []
    assert run_concurrently(square, range(6), 3, done=lambda: finished.append(1)) == [
        0, 1, 4, 9, 16, 25]
    assert len(finished) == 6
    assert run_concurrently(lambda x: -x, [1, 2], 1) == [-1, -2]

    def bad(x):
        if x == 1:
            raise ValueError("run 1 failed")
        time.sleep(0.05)
        return x
    with pytest.raises(ValueError, match="run 1 failed"):
        run_concurrently(bad, range(8), 2)


def test_ports_handed_out_at_once_from_several_threads_are_distinct():
    from concurrent.futures import ThreadPoolExecutor

    from recsys.launch import free_port

    with ThreadPoolExecutor(4) as ex:
        ports = list(ex.map(lambda _: free_port(), range(40)))
    assert len(set(ports)) == 40
