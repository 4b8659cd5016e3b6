"""The DAG end to end on a tiny synthetic world: world → ingest → embed → pairs → align →
quantize → quantize_raw → examples → train (six arms, two gloo ranks each, two arms at once,
and the baselines) → evaluate, then assign-only coding with the fitted codebook."""

from __future__ import annotations

import re

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from feature_store.snapshots import SnapshotStore
from jobs.cli import main
from jobs.config import load_config
from tests.conftest import DS, EXTRA, _args, tiny_world_overrides

@pytest.fixture(scope="module")
def run(e2e_run):
    return e2e_run


@pytest.fixture
def own_run(run, tmp_path):
    """A private copy of the run's state and store for a test that runs stages again, so that
    no test sees another's writes (the tests pass in any order). The copied manifests still
    point at the shared run's data files, which are only read; MLflow is off in the copy."""
    import shutil

    root = tmp_path / "q"
    shutil.copytree(run[0], root, ignore=shutil.ignore_patterns("spark", "runs", "mlartifacts"))
    return root, SnapshotStore(str(root / "store"))


def _own_args(root, *extra):
    return _args(root, "--set", "mlflow.enabled=false", *extra)


def test_every_stage_ran_and_printed_its_report(run):
    _, _, dag, out = run
    for stage in ("world", "ingest", "split", "pretrain", "embed", "pairs", "align", "quantize",
                  "quantize_raw", "examples", "train", "evaluate", "promote", "retrieve",
                  "promote_retriever", "publish"):
        assert dag.state.last_success(DS, stage) is not None, stage
    for needle in ("rows_in", "embedded 120 of 120", "mean score", "aligned encoder",
                   "10-NN purity", "utilization", "sharing an RQ prefix", "mean history",
                   "examples/s", "cold AUC", "truth (ceiling)", "codes+frozen",
                   "split global_time", "validation part:", "known AUC", "frozen_aligned",
                   "paired differences", "codes - frozen_aligned", "cal NE", "best step",
                   "published online store"):
        assert needle in out, needle


def test_examples_account_for_every_event_and_never_leak_history(run):
    _, store, _, _ = run
    tables = ("train_examples", "valid_examples", "eval_examples")
    events = store.read_arrow("events").to_pandas()
    both = pd.concat([store.read_arrow(t).to_pandas() for t in tables])
    assert (~both.sampled).sum() == len(events) == sum(store.get(t).row_count for t in tables)
    tr = store.get("train_examples")
    assert tr.facts.levels == 2 and tr.facts.codebook_version == store.get(
        "item_codes").facts.codebook_version
    pos = events[events.label == 1]
    by_user = {u: g.sort_values("ts") for u, g in pos.groupby("user_id")}
    for r in both.sample(300, random_state=0).itertuples():
        g = by_user.get(r.user_id)
        earlier = [] if g is None else g[g.ts < r.ts].item_id.tolist()[-20:]
        assert list(r.hist_item_ids) == earlier


def test_every_arm_is_scored_evaluated_and_registered_with_its_versions(run):
    root, store, _, _ = run
    preds = store.read_arrow("ranker_predictions").to_pandas()
    n_eval = store.get("eval_examples").row_count
    n_scored = n_eval + store.get("valid_examples").row_count
    arms = ("id_only", "frozen_mm", "frozen_aligned", "codes", "codes_raw", "codes+frozen")
    assert preds.groupby("arm").size().to_dict() == {
        a: n_scored for a in arms + ("popularity", "mf")}
    assert set(preds.part) == {"valid", "test"} and set(preds.seed) == {0}
    assert preds.score.between(0, 1).all()
    metrics = store.read_arrow("ranker_metrics").to_pandas()
    assert set(metrics.arm) == set(preds.arm) | {"truth (ceiling)"}
    assert set(metrics.part) == {"valid", "test"}
    assert {"all", "cold", "known_users"} <= set(metrics.slice)
    test_all = metrics[(metrics.part == "test") & (metrics.slice == "all")]
    assert (test_all.auc_lo <= test_all.auc).all() and (test_all.auc <= test_all.auc_hi).all()
    ceiling = metrics[(metrics.arm == "truth (ceiling)") & (metrics.slice == "all")
                      & (metrics.part == "test")].auc.item()
    assert ceiling > 0.6
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    versions = mlflow.MlflowClient().search_model_versions("name='qarm-ranker'")
    assert {v.tags["arm"] for v in versions} == set(arms)
    codebook = store.get("train_examples").facts.codebook_version
    encoder = store.get("aligned_item_embeddings").facts.encoder_version
    for v in versions:
        if v.tags["arm"] in ("codes", "codes+frozen"):
            assert v.tags["codebook_version"] == codebook and v.tags["encoder_version"] == encoder
            assert v.tags["codebook_model_version"] and v.tags["encoder_model_version"]
        elif v.tags["arm"] == "frozen_aligned":
            assert v.tags["encoder_version"] == encoder and "codebook_version" not in v.tags
        else:
            assert "codebook_version" not in v.tags and "encoder_version" not in v.tags
    # The registered model, scored in this process, reproduces the distributed run's scores.
    from recsys.scorer import score

    v = next(v for v in versions if v.tags["arm"] == "codes")
    from recsys.saved import load_ranker

    model = load_ranker(mlflow.artifacts.download_artifacts(artifact_uri=v.source))
    assert model.spec.arm == "codes"
    rows = store.read_arrow("eval_examples")
    got = pd.DataFrame({"user_id": rows.column("user_id").to_numpy(),
                        "item_id": rows.column("item_id").to_numpy(),
                        "ts": rows.column("ts").to_pandas(), "mine": score(model, rows)})
    both = got.merge(preds[preds.arm == "codes"], on=["user_id", "item_id", "ts"])
    assert len(both) == n_eval
    np.testing.assert_allclose(both.mine, both.score, atol=1e-5)


def test_retrieve_writes_candidates_the_table_and_registers_every_tower(run, capsys):
    import json

    root, store, _, out = run
    for needle in ("cold R@50", "code_prefix", "two_stage", "paired differences",
                   "ids+codes - ids (cold, recall@50)", "qarm-retriever v"):
        assert needle in out, needle
    cand = store.read_arrow("candidates").to_pandas()
    facts = store.get("candidates").facts
    assert facts.top_k == 20 and facts.retriever in ("ids", "codes", "ids+codes")
    assert set(cand.retriever) == {facts.retriever}
    events = store.read_arrow("events").to_pandas()
    own = events[events.label == 1].groupby("user_id").item_id.apply(set)
    assert cand.user_id.nunique() == len(own)
    for u, g in cand.groupby("user_id"):
        assert not set(g.item_id) & own[u]                   # never the user's own positives
        g = g.sort_values("rank")
        assert g["rank"].tolist() == list(range(1, len(g) + 1))
        assert (np.diff(g.score.to_numpy()) <= 1e-6).all()
    summary = json.loads((root / "runs" / DS / "evaluate" / "retrieval.json").read_text())
    names = {r["retriever"] for r in summary["rows"]}
    assert {"ids", "codes", "ids+codes", "random", "popularity", "item2item", "content",
            "code_prefix", "two_stage"} <= names
    for r in summary["rows"]:
        assert r["n"] == 0 or r["lo"] <= r["value"] <= r["hi"]
    # The run report plots recall@K of every retriever.
    report = json.loads(sorted((root / "reports").glob("*/summary.json"))[-1].read_text())
    assert [k for k, _ in report["retrieval"]["codes"]] == [10, 20, 50]
    assert {"two_stage", "code_prefix"} <= set(report["retrieval"])
    reg = _registry(root)
    codes = reg.find("qarm-retriever", item_repr="codes")
    chain = reg.lineage("qarm-retriever", codes.version)
    assert [c["model"] for c in chain][:3] == ["qarm-retriever", "qarm-codebook",
                                               "qarm-item-encoder"]
    assert codes.tags["codebook_version"] == store.get("item_codes").facts.codebook_version
    assert "codebook_version" not in reg.find("qarm-retriever", item_repr="ids").tags
    # One user's recommendations, with titles, re-ranked by the registered ranker.
    user = store.read_arrow("user_id_map").to_pandas().external_id.iloc[0]
    assert main(["recommend", "--set", f"paths.root={root}", "--set",
                 f"mlflow.tracking_uri=sqlite:///{root}/mlflow.db", "--user", str(user),
                 "--k", "5"]) == 0
    printed = capsys.readouterr().out
    assert "re-ranked by qarm-ranker" in printed and printed.count("\n") >= 7
    assert main(["recommend", "--set", f"paths.root={root}", "--set",
                 f"mlflow.tracking_uri=sqlite:///{root}/mlflow.db", "--user", "nobody"]) == 0
    assert "unknown: the most popular items" in capsys.readouterr().out


def test_embed_writes_one_unit_embedding_per_item_loading_the_model_once_per_worker(run):
    _, store, dag, _ = run
    emb = store.read_arrow("item_embeddings")
    assert emb.schema.field("embedding").type == pa.list_(pa.float32(), 16)
    assert emb.num_rows == store.get("items").row_count == 120
    assert len(set(emb.column("item_id").to_pylist())) == 120
    vecs = np.stack(emb.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    assert set(emb.column("encoder_version").to_pylist()) == {
        store.get("item_embeddings").facts.encoder_version}
    # Loaded once per Python worker process (2 cores), not once per partition (6) or batch.
    assert 1 <= dag.state.last_success(DS, "embed")["metrics"]["encoder_loads"] < 6
    assert store.get("item_features").row_count == 120


def test_pairs_and_aligned_embeddings(run):
    _, store, _, _ = run
    pairs = store.read_arrow("item_pairs").to_pandas()
    assert set(pairs.source) <= {"swing", "itemcf", "u2i"} and len(pairs) > 0
    assert (pairs.src != pairs.dst).all()
    aligned = store.get("aligned_item_embeddings")
    raw = store.get("item_embeddings")
    assert aligned.row_count == 120
    assert aligned.facts.encoder_version != raw.facts.encoder_version
    assert aligned.facts.pairs_snapshot == store.get("item_pairs").ref


def test_aligned_encoder_is_registered_with_its_pair_snapshot(run):
    root, store, _, _ = run
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    versions = client.search_model_versions("name='qarm-item-encoder'")
    assert versions
    tags = versions[0].tags
    assert tags["pairs_snapshot"] == store.get("item_pairs").ref
    assert tags["encoder_version"] == store.get("aligned_item_embeddings").facts.encoder_version


def _codes(store, table, snapshot_id=None):
    t = store.read_arrow(table, snapshot_id).sort_by("item_id")
    return (t.column("item_id").to_numpy(),
            np.stack(t.column("rq").to_numpy(zero_copy_only=False)),
            np.stack(t.column("vq").to_numpy(zero_copy_only=False)),
            set(t.column("codebook_version").to_pylist()))


def test_codes_for_every_item_and_assign_only_gives_the_same_codes(own_run, capsys):
    root, store = own_run
    fitted = store.get("item_codes")
    version = fitted.facts.codebook_version
    ids, rq, vq, versions = _codes(store, "item_codes", fitted.snapshot_id)
    assert len(ids) == 120 and versions == {version}
    assert rq.shape == (120, 2) and rq.max() < 8 and vq.shape == (120, 5) and (vq >= 0).all()
    raw = store.get("item_codes_raw")
    assert raw.facts.codebook_version != version

    assert main(["quantize", *_own_args(root, "--assign-only", "--codebook", version)]) == 0
    assert "existing, assign-only" in capsys.readouterr().out
    again = store.get("item_codes")
    assert again.snapshot_id != fitted.snapshot_id and again.facts.fitted is False
    ids2, rq2, vq2, versions2 = _codes(store, "item_codes", again.snapshot_id)
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_array_equal(rq, rq2)
    np.testing.assert_array_equal(vq, vq2)
    assert versions2 == {version}

    assert main(["quantize", *_own_args(root, "--codebook", "cb-nope")]) == 2
    assert "no codebook cb-nope" in capsys.readouterr().err
    assert main(["quantize", *_own_args(root, "--assign-only")]) == 2
    assert "needs --codebook" in capsys.readouterr().err


def test_a_cold_item_coded_assign_only_is_retrieved_through_its_codes(own_run, capsys):
    from recsys.retrievers import CodePrefix

    root, store = own_run
    version = store.get("item_codes").facts.codebook_version
    assert main(["quantize", *_own_args(root, "--assign-only", "--codebook", version)]) == 0
    capsys.readouterr()
    ids, rq, _, _ = _codes(store, "item_codes")
    split = store.read_arrow("split_events").to_pandas()
    pop = np.bincount(split[(split.part == "train") & (split.label == 1)].item_id,
                      minlength=len(ids))
    cold = np.setdiff1d(ids, split[split.part == "train"].item_id.unique())
    assert len(cold)
    checked = 0
    for c in cold:
        prefix = (rq[:, 0] == rq[c, 0]) & (rq[:, 1] == rq[c, 1])
        same = np.flatnonzero(prefix & (pop > 0))
        if not len(same):
            continue
        hist = ids[same][:5]
        scores = CodePrefix(rq, 8, pop, recent=5).scores([hist])[0]
        scores[hist] = -np.inf
        order = np.argsort(-scores.numpy(), kind="stable")
        # Only items sharing its whole prefix (warm ones first, by popularity) come before it.
        assert int(np.flatnonzero(order == c)[0]) < int(prefix.sum()) - len(hist)
        checked += 1
    assert checked >= 1


def test_pretrain_tags_every_item_registers_the_tagger_and_tags_a_folder(run, tmp_path,
                                                                         capsys):
    import json

    root, store, _, out = run
    pred = store.read_arrow("item_pred_tags").to_pandas()
    facts = store.get("item_pred_tags").facts
    assert len(pred) == 120 and pred.pred_tags.map(len).between(1, 5).all()
    assert facts.version and facts.n_train + facts.n_holdout == 120 and facts.tags > 5
    assert "held-out mAP" in out and "label-frequency baseline" in out
    reg = _registry(root)
    assert reg.find("qarm-tagger", tagger_version=facts.version) is not None
    items = store.read_arrow("items", columns=["item_id", "image"]).to_pandas().head(3)
    for r in items.itertuples():
        (tmp_path / f"{r.item_id}.png").write_bytes(r.image)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    args = ["--set", f"paths.root={root}", "--set",
            f"mlflow.tracking_uri=sqlite:///{root}/mlflow.db"]
    assert main(["tag", str(tmp_path), "--json", "--top", "3", *args]) == 0
    rows = {r["file"]: r for r in json.loads(capsys.readouterr().out)}
    assert "not a decodable image" in rows["broken.jpg"]["error"]
    for r in items.itertuples():
        got = rows[f"{r.item_id}.png"]["tags"]
        assert 1 <= len(got) <= 3
        stage = list(pred[pred.item_id == r.item_id].pred_tags.iloc[0])
        assert [t["tag"] for t in got] == stage[:len(got)]


def test_examples_carry_the_predicted_tags_and_a_ranker_can_read_them(own_run, capsys):
    root, store = own_run
    pred = store.read_arrow("item_pred_tags").to_pandas()
    ex = store.get("train_examples")
    vocab = ex.facts.pred_tag_vocab
    assert list(vocab) == sorted({t for tags in pred.pred_tags for t in tags})
    assert ex.facts.mean_pred_tags >= 1.0
    got = store.read_arrow("train_examples", columns=["item_id", "pred_tags"]).to_pandas()
    want = dict(zip(pred.item_id, pred.pred_tags))
    for r in got.itertuples():
        assert [vocab[i] for i in r.pred_tags] == list(want[r.item_id])
    assert main(["train", *_own_args(root, "--set", "train.model.pred_tags=true",
                                     "--set", "train.arms=[codes]",
                                     "--set", "train.baselines=[]")]) == 0
    assert "codes" in capsys.readouterr().out
    assert store.get("ranker_predictions").facts.arms == ("codes",)


def test_the_tagger_backbone_is_the_image_tower_when_configured(own_run, capsys):
    root, store = own_run
    assert main(["embed", *_own_args(root, "--set", "encoder.image_tower=tagger")]) == 0
    assert "image=tagger" in capsys.readouterr().out
    dims = store.get("item_features").facts.dims
    assert dims["image"] == 128                          # MlTr micro's pooled width (4C)


def test_pretrain_trains_the_video_text_model_and_it_can_be_the_video_tower(own_run, capsys):
    root, store = own_run
    vt = store.get("item_video_embeddings")
    f = vt.facts
    assert f.version and f.model == "camoe" and f.loss == "dsl" and f.dim == 24
    assert f.n_train + f.n_holdout == vt.row_count == 120 and 0 <= f.t2v_r1 <= 100
    emb = store.read_arrow("item_video_embeddings").to_pandas()
    assert emb.embedding.map(len).eq(24).all()
    assert main(["embed", *_own_args(root, "--set", "encoder.video_tower=camoe")]) == 0
    capsys.readouterr()
    from mm_encoder.item_encoder import ItemEncoder

    m = store.get("item_embeddings")
    enc = ItemEncoder.load(m.facts.encoder_artifact)
    assert enc.cfg.video_tower == "camoe" and enc.cfg.camoe_path == f.folder
    assert enc.towers.dims()["video"] == 24 and m.row_count == 120


def test_the_ablation_runs_its_grid_then_its_seeds_two_at_once_in_the_arms_order(own_run,
                                                                                   capsys):
    import json

    root, _ = own_run
    assert main(["ablation", *_own_args(
        root, "--set", "train.arms=[id_only,codes]", "--set", "ablation.seeds=2",
        "--set", "ablation.grid={sparse_lr: [0.1, 0.3]}", "--set", "ablation.bootstrap=50",
        "--set", "train.parallel_arms=2")]) == 0
    out = capsys.readouterr().out
    assert "chosen on the validation part" in out
    folder = next((root / "ablation").iterdir())
    res = json.loads((folder / "ablation.json").read_text())
    assert [(g["arm"], g["settings"]["sparse_lr"]) for g in res["grid"]] == [
        ("id_only", 0.1), ("id_only", 0.3), ("codes", 0.1), ("codes", 0.3)]
    assert [(r["arm"], r["seed"]) for r in res["runs"]] == [
        ("id_only", 0), ("id_only", 1), ("codes", 0), ("codes", 1)]
    for arm in ("id_only", "codes"):
        grid = [g for g in res["grid"] if g["arm"] == arm]
        best = max(grid, key=lambda g: g["best_valid"])
        assert res["chosen"][arm] == best["settings"]
        # Seed 0 is the chosen grid run itself, not a run of its own.
        assert next(r for r in res["runs"] if r["arm"] == arm and r["seed"] == 0
                    )["best_valid"] == best["best_valid"]
    preds = pd.read_parquet(folder / "predictions.parquet")
    trained = preds[preds.arm.isin(["id_only", "codes"])]
    assert set(zip(trained.arm, trained.seed)) == {("id_only", 0), ("id_only", 1),
                                                  ("codes", 0), ("codes", 1)}
    # Every seed scored the same rows.
    sizes = trained.groupby(["arm", "seed"]).size()
    assert sizes.nunique() == 1


def test_rerun_skips_everything(own_run, capsys):
    root, _ = own_run
    assert main(["run", *_own_args(root, "--until", "align")]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 7 and " done " not in out


def test_disambiguation_level_makes_every_code_unique(own_run, capsys):
    root, store = own_run
    before = store.get("item_codes")
    ids, rq, _, _ = _codes(store, "item_codes", before.snapshot_id)
    assert main(["quantize", *_own_args(root, "--set", "quantize.disambiguate=true")]) == 0
    capsys.readouterr()
    after = store.get("item_codes")
    assert after.facts.disambiguated is True
    ids2, rq2, _, _ = _codes(store, "item_codes", after.snapshot_id)
    np.testing.assert_array_equal(ids, ids2)
    assert rq2.shape == (120, 3)
    np.testing.assert_array_equal(rq2[:, :2], rq)          # the semantic levels are unchanged
    assert len({tuple(r) for r in rq2}) == 120              # every full code is unique
    # The extra level numbers the items of each shared code 0, 1, 2, ... in item-id order.
    for code in {tuple(r) for r in rq}:
        members = np.flatnonzero((rq == code).all(1))
        assert rq2[members, 2].tolist() == list(range(len(members)))


def test_align_can_fine_tune_the_text_towers_last_layer(own_run, capsys):
    root, store = own_run
    assert main(["align", *_own_args(root, "--force", "--set", "align.tune_text_layers=1",
                                     "--set", "align.epochs=1")]) == 0
    capsys.readouterr()
    feats = store.get("aligned_item_features")
    aligned = store.get("aligned_item_embeddings")
    assert feats.row_count == aligned.row_count == 120
    from mm_encoder.item_encoder import ItemEncoder

    enc = ItemEncoder.load(aligned.facts.encoder_artifact)
    assert enc.text_state and all(k.startswith("encoder.layer.5.") for k in enc.text_state)


def test_the_run_writes_a_self_contained_report_whose_table_is_summary_json(run):
    import json
    from pathlib import Path

    from tests.report_checks import check_report

    root, _, _, out = run
    line = [ln for ln in out.splitlines() if ln.startswith("report: ")]
    assert line, "qarm run must print the report's path"
    path = Path(line[-1][len("report: "):])
    assert path.parent.parent == root / "reports" and path.exists()
    summary = json.loads((path.parent / "summary.json").read_text())
    assert summary["ds"] == DS and summary["ablation"]["arms"]
    checked = check_report(path.read_text(), summary)
    # Every arm's four slices x six metrics, and every paired difference's three numbers.
    assert checked["test"] >= 6 * len(summary["ablation"]["arms"])
    assert checked["pair"] == 3 * len(summary["ablation"]["pairs"]) > 0
    assert checked["images"] >= 4
    trained = {a for a in summary["ablation"]["arms"] if a != "popularity" and a != "mf"
               and not a.startswith("truth")}
    assert set(summary["training"]) == trained and len(trained) == 6
    stages = {s["stage"]: s for s in summary["stages"]}
    assert stages["ingest"]["quarantined"] == {"quarantine": 0}
    assert stages["ingest"]["inputs"]["raw_events"] > 0
    assert {v["model"] for v in summary["registered"]} >= {"qarm-ranker", "qarm-item-encoder"}


# --------------------------------------------------------------------------- registry and gate
def _registry(root):
    from jobs.registry import Registry

    return Registry(load_config(None, tiny_world_overrides(root) + EXTRA))


def _copy_version(reg, v, tmp_path, name, tags=None, perturb=None):
    """A new qarm-ranker version: ``v``'s files (weights optionally changed) and tags."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / name
    shutil.copytree(reg.download(v), folder)
    if perturb is not None:
        w = load_file(str(folder / "weights.safetensors"))
        save_file(perturb(w), str(folder / "weights.safetensors"))
    return reg.client.create_model_version("qarm-ranker", folder.as_uri(),
                                           tags={**v.tags, **(tags or {})})


def _inverted(w):
    """The same ranker with its logit negated exactly, so its AUC is 1 - the original's: a
    reliably worse model even on a tiny world. The user vector is the first ``d`` inputs of the
    cross net and the MLP; negating the user table, those input columns of every cross layer's V
    and of the first MLP layer leaves the hidden activations unchanged (x_l becomes S x_l with S
    = diag(-1 on the user slice, 1 elsewhere), and V S S x = V x), and negating the last MLP
    layer and the user table negates both the MLP term and the user x item dot term."""
    w = dict(w)
    d = w["sparse.ebc.embedding_bags.user.weight"].shape[1]
    w["sparse.ebc.embedding_bags.user.weight"] = -w["sparse.ebc.embedding_bags.user.weight"]
    for k in [k for k in w if re.fullmatch(r"over\.cross\.v\.\d+\.weight", k)] + [
            "over.mlp.0.weight"]:
        v = w[k].clone()
        v[:, :d] = -v[:, :d]
        w[k] = v
    last = max(int(k.split(".")[2]) for k in w if k.startswith("over.mlp."))
    for k in (f"over.mlp.{last}.weight", f"over.mlp.{last}.bias"):
        w[k] = -w[k]
    return w


def test_the_first_run_promotes_against_popularity_and_prints_the_champions_lineage(run):
    root, store, dag, out = run
    reg = _registry(root)
    promo = store.read_arrow("promotions").to_pylist()
    assert len(promo) == 1 and promo[0]["against"] == "popularity (no champion yet)"
    chall = reg.alias("qarm-ranker", "challenger")
    assert chall.tags["arm"] == "codes" and promo[0]["challenger"] == str(chall.version)
    champ = reg.alias("qarm-ranker", "champion")
    # Promoted exactly when the lower bound against popularity is above 0.
    assert promo[0]["promoted"] == (promo[0]["lo"] > 0) == (champ is not None)
    assert "[promote]" in out and ("PROMOTED" in out) == promo[0]["promoted"]
    chain = reg.lineage("qarm-ranker", chall.version)
    assert [c["model"] for c in chain] == ["qarm-ranker", "qarm-codebook", "qarm-item-encoder",
                                           "qarm-item-encoder"]
    assert chain[1]["tags"]["codebook_version"] == chall.tags["codebook_version"]
    assert chain[0]["tags"]["examples"] == store.get("train_examples").ref


def test_the_gate_accepts_better_refuses_worse_tied_and_inconsistent_lineage(run, tmp_path,
                                                                             capsys):
    from jobs.config import RegistryConfig
    from jobs.stages.promote import GateData, compare

    root, store, _, _ = run
    reg = _registry(root)
    good = reg.find("qarm-ranker", arm="codes")
    worse = _copy_version(reg, good, tmp_path, "worse", perturb=_inverted)
    tied = _copy_version(reg, good, tmp_path, "tied")
    data = GateData.read(lambda t, columns=None: store.read_arrow(t, columns=columns))
    rcfg = RegistryConfig(bootstrap=300)
    better = compare(reg, good, worse, data, rcfg)
    assert better.promoted and better.stats["lo"] > 0, better.text()
    refused = compare(reg, worse, good, data, rcfg)
    assert not refused.promoted and refused.stats["hi"] < 0, refused.text()
    same = compare(reg, tied, good, data, rcfg)
    assert not same.promoted and same.stats["diff"] == 0.0 and "not above 0" in same.reason
    # Worse than popularity: the first-run rule refuses it as well.
    first = compare(reg, worse, None, data, rcfg)
    assert first.against.startswith("popularity") and not first.promoted
    # A ranker whose registered codebook is another one (the raw codes' codebook) is refused
    # before any scoring.
    raw_cb = reg.find("qarm-codebook", kind="raw")
    wrong = _copy_version(reg, good, tmp_path, "wrong",
                          tags={"codebook_model_version": raw_cb.version})
    bad = compare(reg, wrong, worse, data, rcfg)
    assert not bad.promoted and not bad.stats and "inconsistent lineage" in bad.reason
    assert raw_cb.tags["codebook_version"] in bad.reason
    # `qarm lineage` prints the chain of a version.
    assert main(["lineage", "--set", f"paths.root={root}", "--set",
                 f"mlflow.tracking_uri=sqlite:///{root}/mlflow.db", "qarm-ranker",
                 str(good.version)]) == 0
    printed = capsys.readouterr().out
    assert f"qarm-ranker v{good.version}" in printed and "qarm-codebook v" in printed


def test_the_retriever_gate_first_run_tie_and_lineage(run, tmp_path):
    from jobs.config import RegistryConfig
    from jobs.stages.promote_retriever import compare
    from jobs.stages.retrieve import read_events
    from recsys.retrieval_data import retrieval_data

    root, store, _, out = run
    reg = _registry(root)
    row = store.read_arrow("retriever_promotions").to_pylist()[0]
    chall = reg.alias("qarm-retriever", "challenger")
    assert row["challenger"] == str(chall.version) == store.get("candidates").facts.retriever_version
    assert row["against"] == "popularity (no champion yet)"
    assert row["promoted"] == (row["lo"] > 0) == (reg.alias("qarm-retriever", "champion")
                                                  is not None)
    assert "qarm-retriever v" in out and "Recall@50 difference" in out
    if row["promoted"]:
        assert "lineage of the champion:\nqarm-retriever v" in out

    class IO:
        def arrow(self, t, columns=None):
            return store.read_arrow(t, columns=columns)

    events, n = read_events(IO())
    data = retrieval_data(events, n, 10)
    rcfg = RegistryConfig(bootstrap=200)
    tied = reg.client.create_model_version("qarm-retriever", chall.source, tags=chall.tags)
    same = compare(reg, tied, chall, data.test, data, rcfg)
    assert not same.promoted and same.stats["diff"] == 0.0 and "not above 0" in same.reason
    codes = reg.find("qarm-retriever", item_repr="codes")
    raw_cb = reg.find("qarm-codebook", kind="raw")
    wrong = reg.client.create_model_version(
        "qarm-retriever", codes.source,
        tags={**codes.tags, "codebook_model_version": raw_cb.version})
    bad = compare(reg, wrong, None, data.test, data, rcfg)
    assert not bad.promoted and "inconsistent lineage" in bad.reason


def test_loading_a_registered_model_never_unpickles(run, tmp_path):
    import pickle
    import shutil

    from recsys.saved import ModelFormatError, load_ranker

    root, _, _, _ = run
    reg = _registry(root)
    folder = tmp_path / "evil"
    shutil.copytree(reg.download(reg.find("qarm-ranker", arm="codes")), folder)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (folder / "weights.safetensors").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ModelFormatError, match="never by unpickling"):
        load_ranker(folder)
    assert not marker.exists()


def test_ground_finds_each_items_highlight_and_embed_encodes_only_it(own_run, capsys,
                                                                      tmp_path):
    root, store = own_run
    extra = ["--set", "ground.enabled=true", "--set", "encoder.video_highlight=true",
             "--set", "ground.synthetic_videos=40", "--set", "ground.synthetic_frames=12",
             "--set", "ground.max_frames=12", "--set", "ground.epochs=2",
             "--set", "ground.dim=16", "--set", "ground.layers=1"]
    assert main(["run", "--only", "ground", *_own_args(root, *extra)]) == 0
    out = capsys.readouterr().out
    assert "[ground]" in out and "trivial (mean span)" in out
    items = store.read_arrow("items", columns=["item_id", "video"]).to_pylist()
    with_video = {r["item_id"] for r in items if r["video"]}
    h = store.read_arrow("item_highlights").to_pandas()
    assert set(h.item_id) == with_video
    assert ((0 <= h.highlight_start) & (h.highlight_start < h.highlight_end)
            & (h.highlight_end <= 1)).all()
    facts = store.get("item_highlights").facts
    assert facts.version.startswith("gmu-") and facts.items == len(with_video)
    # `qarm ground VIDEO QUERY` on an item's frames, with the model the stage trained.
    frames = next(r["video"] for r in items if r["video"])
    for k, f in enumerate(frames):
        (tmp_path / f"{k:03d}.png").write_bytes(f)
    assert main(["ground", str(tmp_path), "a red circle moves left", "--top", "2",
                 *_own_args(root, *extra)]) == 0
    table = capsys.readouterr().out
    assert table.count("\n") >= 3 and "first_frame" in table
    # The embed stage reads the highlights (and so encodes only them).
    assert main(["run", "--only", "embed", *_own_args(root, *extra)]) == 0
    assert store.get("item_highlights").ref in store.get("item_embeddings").parents


def test_the_content_ceiling_check_scores_every_variant_of_the_run(run):
    """``make ceiling-check``'s script on the run: the MF baseline with each content table."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, str(repo / "checks" / "content_ceiling.py"), "--root",
                        str(run[0]), "--seeds", "1", "--bootstrap", "20"],
                       capture_output=True, text=True, cwd=repo)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    rows = {r["arm"]: r for r in out["rows"] if r["slice"] == "all"}
    assert set(rows) == {"ids", "aligned", "content", "posterior", "topic"}
    assert all(0.0 <= r["auc"] <= 1.0 and r["n"] == out["test_examples"] for r in rows.values())
    assert rows["topic"]["auc"] > rows["ids"]["auc"]
    assert 0.0 < out["purity"]["chance"] < out["purity"]["perfect_shape_motion"] <= 1.0
    assert "posterior" in p.stderr and "10-NN topic purity" in p.stderr

