"""The ablation's statistics (bootstrap intervals over users, paired differences, calibration),
the baselines, and the grid's choice (real training runs on small examples)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from feature_store.facts import ExamplesFacts
from recsys.ablation import (Scored, ablation_stats, calibrate, fit_platt, percentile_interval,
                             user_resamples, weighted_auc)
from recsys.config import MFConfig, ModelConfig, TrainConfig
from recsys.evaluation import evaluate, format_table, metrics_frame
from recsys.metrics import auc, gauc, logloss
from recsys.testing import random_examples, write_examples


def _preds(arm, users, labels, scores, seed=0, cold=None):
    n = len(users)
    return pd.DataFrame({"arm": arm, "seed": seed, "part": "test", "user_id": users,
                         "item_id": np.arange(n), "ts": np.arange(n), "label": labels,
                         "score": scores, "cold": np.zeros(n, bool) if cold is None else cold,
                         "new_user": np.zeros(n, bool)})


# --------------------------------------------------------------------------- bootstrap


def test_the_bootstrap_interval_matches_a_hand_computed_case():
    # User 1 is ranked perfectly (AUC 1), user 2 backwards (AUC 0). A resample of two users is
    # {1,1} (AUC 1, probability 1/4), {1,2} (pooled AUC 0.5: of the 4 positive-negative pairs
    # one is right, two are ties, one is wrong; probability 1/2) or {2,2} (AUC 0, 1/4).
    p = _preds("a", [1, 1, 2, 2], [1, 0, 1, 0], [0.9, 0.1, 0.1, 0.9])
    stats = ablation_stats(p, B=4000, seed=3, slices=("all",), pairs=())
    row = stats.rows[0]
    assert row["auc"] == 0.5 and row["n"] == 4 and row["users"] == 2
    assert row["auc_ci"] == [0.0, 1.0]
    # A 40% interval sits inside the middle half of the distribution: exactly 0.5.
    narrow = ablation_stats(p, B=4000, seed=3, slices=("all",), pairs=(), level=0.4)
    assert narrow.rows[0]["auc_ci"] == [0.5, 0.5]
    # LogLoss per resample: {1,1}: -log 0.9, {2,2}: -log 0.1, {1,2}: their mean.
    lo, hi = row["logloss_ci"]
    assert lo == pytest.approx(-np.log(0.9)) and hi == pytest.approx(-np.log(0.1))


def test_paired_differences_resample_the_same_users_for_both_arms():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(200), 10)
    y = rng.random(2000) < 0.3
    base = rng.random(2000)
    a = _preds("a", users, y, base)
    b = _preds("b", users, y, base)                  # identical scores: the difference is 0
    c = _preds("c", users, y, np.where(y, base + 0.2, base))    # better on every user
    stats = ablation_stats(pd.concat([a, b, c]), B=300, slices=("all",),
                           pairs=(("a", "b"), ("c", "a")))
    ab = next(p for p in stats.pairs if p["a"] == "a" and p["metric"] == "auc")
    assert ab["diff"] == 0 and ab["ci"] == [0.0, 0.0]
    ca = next(p for p in stats.pairs if p["a"] == "c" and p["metric"] == "auc")
    assert ca["diff"] > 0 and ca["ci"][0] > 0 and ca["p_le_0"] == 0.0
    # Paired: the interval of the difference is narrower than either arm's own interval.
    ra = next(r for r in stats.rows if r["arm"] == "a")
    assert ca["ci"][1] - ca["ci"][0] < ra["auc_ci"][1] - ra["auc_ci"][0]


def test_weighted_metrics_equal_the_plain_ones_on_repeated_rows():
    rng = np.random.default_rng(1)
    users = rng.integers(0, 30, 400)
    y = (rng.random(400) < 0.4).astype(int)
    s = np.round(rng.random(400), 2)                 # ties included
    uniq, counts = user_resamples(users, 1, seed=5)
    c = counts[0]
    sc = Scored(np.searchsorted(uniq, users), y, s)
    m = sc.metrics(c)
    rep = np.repeat(np.arange(400), c[np.searchsorted(uniq, users)])
    # A user drawn k times counts k times; GAUC's users are the resampled copies.
    copies = np.concatenate([[f"{users[i]}-{j}" for j in range(c[np.searchsorted(uniq,
                                                                                   [users[i]])[0]])]
                             for i in range(400)])
    assert m["auc"] == pytest.approx(auc(y[rep], s[rep]))
    assert m["logloss"] == pytest.approx(logloss(y[rep], s[rep]))
    order = np.argsort(copies, kind="stable")
    g, _, _ = gauc(copies[order], y[np.sort(rep)][order] if False else y[rep][order],
                   s[rep][order])
    assert m["gauc"] == pytest.approx(g)
    assert weighted_auc(y, s, np.full(400, 2.0)) == pytest.approx(auc(y, s))
    assert percentile_interval(np.array([np.nan, 1.0, 2.0]), 0.0) == (1.5, 1.5)


# --------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("case", ["overconfident", "shifted", "calibrated", "adversarial"])
def test_calibration_is_never_worse_on_the_held_out_half(case):
    from recsys.ablation import _ll, user_half

    rng = np.random.default_rng(7)
    users = np.repeat(np.arange(400), 20)
    p = rng.uniform(0.02, 0.6, len(users))
    y = (rng.random(len(users)) < p).astype(float)
    s = {"overconfident": p ** 3 / (p ** 3 + (1 - p) ** 3), "shifted": np.clip(p + 0.2, 0, 1),
         "calibrated": p, "adversarial": p}[case]
    if case == "adversarial":              # the halves disagree: the fit half's labels flip
        half = user_half(users)
        y = np.where(~half, 1 - y, y)
    cal = calibrate(users, y, s)
    hold = user_half(users)
    assert _ll(y[hold], cal.apply(s)[hold]) <= _ll(y[hold], s[hold]) + 1e-12
    assert cal.holdout_after <= cal.holdout_before
    if case in ("overconfident", "shifted"):
        assert cal.kept and cal.holdout_after < cal.holdout_before - 1e-3
    if case == "shifted":                   # only an intercept can move the level back
        assert cal.kind == "platt"
    if case == "adversarial":
        assert not cal.kept and (cal.a, cal.b, cal.kind) == (1.0, 0.0, "none")


def test_the_held_out_half_keeps_temperature_when_the_fitting_half_has_another_base_rate():
    # The scores are overconfident for everyone, but the fitting half's users click more
    # (logit + 1.2) than the held-out half's: Platt's intercept learns that level and carries
    # it to users who do not share it; the slope alone does not. (On MovieLens' global time
    # split the validation users' positive rate is 0.60 against the test users' 0.47.)
    from recsys.ablation import Calibration, _ll, _logit, user_half

    rng = np.random.default_rng(11)
    users = np.repeat(np.arange(400), 20)
    fit = ~user_half(users)
    p = rng.uniform(0.05, 0.95, len(users))
    z = _logit(p)
    truth = np.where(fit, 1 / (1 + np.exp(-(z + 1.2))), p)
    y = (rng.random(len(users)) < truth).astype(float)
    s = 1 / (1 + np.exp(-2.5 * z))                              # overconfident
    cal = calibrate(users, y, s)
    hold = ~fit
    platt = Calibration(*fit_platt(y[fit], s[fit]))
    assert cal.kind == "temperature" and cal.b == 0.0 and 0.2 < cal.a < 0.6
    assert cal.holdout_after < _ll(y[hold], platt.apply(s[hold])) - 0.01
    assert cal.holdout_after < _ll(y[hold], s[hold]) - 0.01


def test_evaluate_reports_intervals_calibration_and_the_training_rate():
    rng = np.random.default_rng(2)
    users = np.repeat(np.arange(60), 10)
    y = rng.random(600) < 0.3
    frames = []
    for part in ("test", "valid"):
        for arm, noise in (("codes", 0.3), ("frozen_aligned", 0.6)):
            for seed in (0, 1):
                sc = 1 / (1 + np.exp(-(y * 1.0 + rng.normal(0, noise, 600) - 1)))
                frames.append(_preds(arm, users, y, sc, seed).assign(part=part))
    res = evaluate(pd.concat(frames, ignore_index=True), train_rate=0.25, bootstrap=50)
    assert res["seeds"] == {"codes": [0, 1], "frozen_aligned": [0, 1]}
    row = next(r for r in res["test"] if r["arm"] == "codes" and r["slice"] == "all")
    assert row["seeds"] == 2 and row["auc_ci"][0] <= row["auc"] <= row["auc_ci"][1]
    assert row["ne_train"] == pytest.approx(row["logloss"] / -(0.25 * np.log(0.25)
                                                                + 0.75 * np.log(0.75)))
    assert set(res["calibration"]) == {"codes/0", "codes/1", "frozen_aligned/0",
                                       "frozen_aligned/1"}
    diff = next(p for p in res["pairs"] if p["a"] == "codes" and p["slice"] == "all"
                and p["metric"] == "auc")
    assert diff["diff"] > 0
    table = format_table(res)
    assert "codes - frozen_aligned" in table and "[" in table
    frame = metrics_frame(res)
    t = frame[(frame.part == "test") & (frame.arm == "codes") & (frame.slice == "all")].iloc[0]
    assert t.auc == row["auc"] and t.auc_lo == row["auc_ci"][0]


# --------------------------------------------------------------------------- baselines


def test_mf_learns_the_signal_and_popularity_scores_cold_items_at_the_base_rate():
    from recsys.baselines import popularity_scores, train_mf

    rng = np.random.default_rng(0)
    n_u, n_i = 100, 60
    pu, qi = rng.normal(size=(n_u, 2)), rng.normal(size=(n_i, 2))

    def draw(n, items=n_i):
        u, i = rng.integers(0, n_u, n), rng.integers(0, items, n)
        p = 1 / (1 + np.exp(-(2 * (pu[u] * qi[i]).sum(1) - 1)))
        return pd.DataFrame({"user_id": u, "item_id": i, "label": (rng.random(n) < p)
                             .astype(np.int8)})

    tr, va, te = draw(8000, 50), draw(1500, 50), draw(1500)
    res = train_mf(tr, va, te, MFConfig(dim=4, lr=1e-2, l2=1e-3, patience=3), seed=0)
    assert auc(te.label, res.test_scores) > 0.7
    assert res.best_epoch == int(np.argmax(res.valid_curve)) + 1
    pop = popularity_scores(tr, te)
    cold = te.item_id >= 50
    assert np.allclose(pop[cold], tr.label.mean())
    # Given each item's content (here its true factors), MF scores the 10 items it never
    # trained on too; without it, their scores carry no signal.
    cfg = MFConfig(dim=4, lr=1e-2, l2=1e-3, patience=3)
    with_content = train_mf(tr, va, te, cfg, seed=0, item_features=qi)
    assert auc(te.label[cold], with_content.test_scores[cold]) > 0.75
    assert auc(te.label[cold], res.test_scores[cold]) < 0.65
    with pytest.raises(ValueError, match="item_features"):
        train_mf(tr, va, te, cfg, item_features=qi[:10])


# --------------------------------------------------------------------------- the grid


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from jobs.stages.train import TrainingData

    root = tmp_path_factory.mktemp("grid")
    train = write_examples(root / "train", random_examples(1280, seed=1))
    valid = write_examples(root / "valid", random_examples(320, seed=2))
    test_t = random_examples(320, seed=3)
    test = write_examples(root / "test", test_t)
    rng = np.random.default_rng(9)
    noisy_labels = np.where(rng.random(320) < 0.5, 1 - test_t.column("label").to_numpy(),
                            test_t.column("label").to_numpy()).astype(np.int8)
    i = test_t.schema.get_field_index("label")
    noisy_t = test_t.set_column(i, test_t.schema.field(i), pa.array(noisy_labels))
    noisy = write_examples(root / "noisy", noisy_t)
    facts = ExamplesFacts(False, 2, 50, 20, "global_time", 5, True, False, 0, None, 8, 3.0,
                          3.0, "cb", "enc")
    data = TrainingData(facts, train, valid, test, 0.3, {}, "train_examples@x")
    return data, dataclasses.replace(data, eval_files=noisy), root


def test_the_grid_never_reads_the_evaluation_labels(small_data):
    from jobs.ablation import grid_combos, run_grids

    data, noisy, root = small_data
    cfg = TrainConfig(model=ModelConfig(dim=8, attention_dim=8, cross_rank=8, mlp=[16]),
                      ranks=1, batch_size=64, epochs=6, valid_every=10, patience=2)
    combos = grid_combos({"sparse_lr": [0.02, 0.3], "l2": [0.0]})
    assert combos == [{"l2": 0.0, "sparse_lr": 0.02}, {"l2": 0.0, "sparse_lr": 0.3}]
    best, runs = run_grids(data, ["codes"], cfg, combos, root / "clean")["codes"]
    # Two runs at once: the same runs, in the grid's order.
    best_n, runs_n = run_grids(noisy, ["codes"], cfg, combos, root / "noisy", workers=2)["codes"]
    assert best["settings"] == best_n["settings"]
    assert [r["best_valid"] for r in runs] == [r["best_valid"] for r in runs_n]
    assert best["best_valid"] == max(r["best_valid"] for r in runs)
    # The evaluation examples were scored (by the chosen run), with their own labels.
    p = best_n["result"].predictions.to_pandas()
    assert (p.label.to_numpy()[-320:] != best["result"].predictions.to_pandas()
            .label.to_numpy()[-320:]).any()
    with pytest.raises(Exception, match="unknown settings"):
        grid_combos({"learning_rate": [1.0]})


# --------------------------------------------------------------------------- compare


def _ablation_dir(path, frames):
    import json

    path.mkdir(parents=True)
    preds = pd.concat(frames, ignore_index=True).assign(sampled=False)
    preds.to_parquet(path / "predictions.parquet", index=False)
    (path / "ablation.json").write_text(json.dumps({"examples": "train_examples@x"}))
    return path


def test_compare_pairs_two_ablations_per_arm_and_refuses_other_examples(tmp_path):
    from jobs.compare import CompareError, compare_ablations, format_compare

    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(150), 12)
    y = (rng.random(len(users)) < 0.3).astype(np.int8)
    cold = np.tile(np.arange(12) < 3, 150)
    base = rng.random(len(users))
    better = np.where(y == 1, base + 0.3, base)
    # Side A: a better content model helps arm "codes" (2 seeds), leaves "id_only" as it is.
    a = _ablation_dir(tmp_path / "tagger", [
        _preds("codes", users, y, better, 0, cold), _preds("codes", users, y, better, 1, cold),
        _preds("id_only", users, y, base, 0, cold), _preds("mf", users, y, base, 0, cold)])
    b = _ablation_dir(tmp_path / "mobilenet", [
        _preds("codes", users, y, base, 0, cold), _preds("id_only", users, y, base, 0, cold),
        _preds("popularity", users, y, base, 0, cold)])
    res = compare_ablations(a, b, bootstrap=300)
    assert res["arms"] == ["codes", "id_only"]                 # only arms both sides have
    rows = {(r["arm"], r["slice"]): r for r in res["rows"]}
    codes = rows[("codes", "all")]
    assert codes["seeds_a"] == 2 and codes["seeds_b"] == 1 and codes["users"] == 150
    assert codes["auc_a"] == pytest.approx(auc(y, better))
    assert codes["auc_diff"] == pytest.approx(auc(y, better) - auc(y, base))
    assert codes["auc_diff_ci"][0] > 0 and codes["auc_p_le_0"] == 0.0
    assert rows[("codes", "cold")]["n"] == 450
    same = rows[("id_only", "all")]
    assert same["auc_diff"] == 0.0 and same["auc_diff_ci"] == [0.0, 0.0]
    text = format_compare(res)
    assert "tagger (A) vs mobilenet (B)" in text and "slice cold" in text
    # Another split (other test rows) cannot be paired.
    other = _ablation_dir(tmp_path / "other", [_preds("codes", users[:-12], y[:-12],
                                                      base[:-12], 0, cold[:-12])])
    with pytest.raises(CompareError, match="different test examples"):
        compare_ablations(a, other, bootstrap=10)
    with pytest.raises(CompareError, match="no ablation.json"):
        compare_ablations(a, tmp_path, bootstrap=10)
    from jobs.cli import main

    assert main(["compare", str(a), str(b), "--label-a", "tagger", "--label-b", "mnv2",
                 "--set", f"paths.root={tmp_path / 'q'}", "--set", "mlflow.enabled=false"]) == 0
    assert (a / "compare-mobilenet.json").is_file() and (a / "compare-mobilenet.txt").is_file()
    assert main(["compare", str(a), str(a), "--set", f"paths.root={tmp_path / 'q'}"]) == 2
