"""The daily job: incremental days (content hashes, the previous day's encoder and codebook),
drift-triggered refits, warm starts, idempotent reruns and backfills (``jobs/daily.py``,
``jobs/stages/drift.py``)."""

from __future__ import annotations

import io
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

from tests.conftest import EXTRA, tiny_world_overrides

D1, D2 = "2026-01-27", "2026-01-28"
#: A small daily world: half the items arrive after the cut-off, about 37 a day (enough for
#: the drift measures to tell new content from more of the same).
DAILY = ["world.n_items=400", "world.daily=true", "world.cold_share=0.5", "split.mode=last_days",
         "daily.incremental=true", "quantize.raw_arm=false", "pairs.window_days=20",
         "train.arms=[codes]", "retrieval.towers=[codes]", "pretrain.enabled=false",
         "train.epochs=3"]


def _sets(root, *extra):
    out = []
    for o in tiny_world_overrides(root) + EXTRA + DAILY + list(extra):
        out += ["--set", o]
    return out


def _qarm(*args) -> tuple[int, str]:
    from jobs.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(list(args))
    return rc, buf.getvalue()


def _facts(root, ds, stage, table):
    from feature_store.snapshots import SnapshotStore
    from jobs.state import RunState

    rec = RunState(root / "state.db").last_success(ds, stage)
    return SnapshotStore(str(root / "store")).resolve(rec["outputs"][table]).facts, rec


# ----------------------------------------------------------------------------- units


def test_drift_measures_separate_new_content_from_more_of_the_same():
    from quantizer.config import RQConfig
    from quantizer.metrics import drift
    from quantizer.rq import ResidualKMeans

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 16))
    def items(n, c):
        x = c[rng.integers(0, len(c), n)] + 0.3 * rng.normal(size=(n, 16))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    old = items(2000, centres)
    rq = ResidualKMeans(RQConfig(levels=2, codes=16, seed=0)).fit(old)
    same = drift(rq, old, items(40, centres))
    new = drift(rq, old, items(40, rng.normal(size=(2, 16))))
    assert same["error_ratio"] < same["error_ratio_null"] + 0.1 and same["error_ratio"] < 1.3
    assert new["error_ratio"] > 1.3 and new["error_ratio"] > new["error_ratio_null"]
    assert new["tv"] > new["tv_null"] and new["tv"] > same["tv"]


def test_decide_refits_on_the_first_day_on_request_and_on_drift_only():
    from jobs.config import load_config
    from jobs.stages.drift import decide

    cfg = load_config(None, ["daily.incremental=true"])
    calm = {"new_items": 50, "error_ratio": 1.05, "error_ratio_null": 1.2, "tv": 0.2,
            "tv_null": 0.3}
    assert decide(cfg, None, False)[0]
    assert not decide(cfg, calm, True)[0]
    assert decide(cfg, {**calm, "error_ratio": 1.8}, True)[0]
    # Beyond the threshold but within what chance gives that few items: no refit.
    assert not decide(cfg, {**calm, "error_ratio": 1.4, "error_ratio_null": 1.5}, True)[0]
    assert not decide(cfg, {**calm, "error_ratio": 3.0, "new_items": 5}, True)[0]
    forced = load_config(None, ["daily.incremental=true", "daily.refit=true"])
    assert decide(forced, calm, True) == (True, "refit asked for (daily.refit / --refit)")


def test_warm_start_keeps_old_rows_initialises_new_ones_and_refuses_other_shapes():
    from recsys.job import TrainError
    from recsys.train import warm_start

    prev = {"t.weight": torch.ones(3, 4), "mlp.w": torch.full((2, 2), 5.0),
            "frozen_table": torch.ones(3, 4)}
    cur = {"t.weight": torch.zeros(5, 4), "mlp.w": torch.zeros(2, 2),
           "frozen_table": torch.full((5, 4), 7.0)}
    warm_start(cur, prev)
    assert (cur["t.weight"][:3] == 1).all() and (cur["t.weight"][3:] == 0).all()
    assert (cur["mlp.w"] == 5).all()
    assert (cur["frozen_table"] == 7).all()          # today's content, never yesterday's
    # A hashed table: an id's row depends on the table size, so each old id's row moves.
    from recsys.data import table_rows

    prev = {"sparse.ec.embeddings.item.weight": torch.arange(7.0).repeat(2, 1).T}
    cur = {"sparse.ec.embeddings.item.weight": torch.full((11, 2), -1.0)}
    warm_start(cur, prev, hashed={"item"})
    ids = np.arange(7)
    moved = cur["sparse.ec.embeddings.item.weight"][table_rows(ids, 11, True)]
    assert torch.equal(moved, prev["sparse.ec.embeddings.item.weight"][table_rows(ids, 7, True)])
    assert (cur["sparse.ec.embeddings.item.weight"] == -1).all(1).sum() == 4
    with pytest.raises(TrainError, match="shape"):
        warm_start({"mlp.w": torch.zeros(3, 3)}, {"mlp.w": torch.zeros(2, 2)})
    with pytest.raises(TrainError, match="has no"):
        warm_start({"other": torch.zeros(1)}, prev)


def test_a_previous_model_of_another_architecture_is_no_warm_start(tmp_path):
    """The previous day's ranker is a start only for a model built the same way: the bias
    term (the default since) gives the same weights another meaning, a width other shapes;
    settings that only steer training do not count."""
    import dataclasses

    from jobs.daily import architecture_change
    from recsys.config import ModelConfig
    from recsys.job import TrainJob

    old = dataclasses.asdict(ModelConfig())
    del old["bias"], old["detach_history"]                   # a job file from before the keys
    TrainJob(arm="codes", spec={}, model=old, train_files=[], eval_files=[],
             out_dir=str(tmp_path), micro_batch=64, epochs=1, max_steps=0, sparse_lr=0.1,
             dense_lr=1e-3, seed=0, checkpoint_every=0).save(tmp_path / "job.json")
    assert architecture_change(tmp_path, ModelConfig()) == "bias False (today True)"
    same = ModelConfig(bias=False)
    assert architecture_change(tmp_path, same) == ""
    assert architecture_change(tmp_path, dataclasses.replace(
        same, l2=0.1, dropout=0.6, init_scale=0.01, detach_history=True)) == ""
    assert architecture_change(tmp_path, dataclasses.replace(same, dim=32)) == \
        "dim 16 (today 32)"


def test_content_hash_follows_every_input_of_the_encoder(spark):
    from pipelines.embed import increment, with_content_hash

    rows = [(1, "a", "x", ["t"], b"img", [b"f1", b"f2"]), (2, "b", None, None, None, None),
            (3, "c", "y", ["t"], b"img", [b"f1"])]
    schema = ("item_id long, title string, text string, tags array<string>, image binary, "
              "video array<binary>")
    before = with_content_hash(spark.createDataFrame(rows, schema))
    rows[0] = (1, "a", "x", ["t"], b"img", [b"f1", b"f3"])     # one frame changed
    rows.append((4, "d", "z", [], None, None))                  # a new item
    after = with_content_hash(spark.createDataFrame(rows, schema))
    inc = increment(after, before.select("item_id", "content_hash"))
    assert sorted(r.item_id for r in inc.to_embed.collect()) == [1, 4]
    assert sorted(r.item_id for r in inc.kept_ids.collect()) == [2, 3]
    assert (inc.kept, inc.changed) == (2, 1)


def test_daily_world_emits_each_evening_and_drift_brings_new_topics_with_new_shapes():
    from pipelines import synthetic as syn
    from pipelines.config import WorldConfig
    from pipelines.drawing import DRIFT_SHAPES, SHAPES

    base = syn.draw_latents(WorldConfig(n_items=400, n_users=50))
    cfg = WorldConfig(n_items=400, n_users=50, daily=True, drift_ds=D2)
    lat = syn.draw_latents(cfg)
    a, end_a = syn.as_of(cfg, lat, D1)
    b, end_b = syn.as_of(cfg, lat, D2)
    assert set(a) < set(b) and end_b - end_a == 86_400_000
    assert (lat.created_ms[a] < end_a).all()
    drifted = lat.created_ms >= syn.day_start_ms(D2)
    assert drifted.any()
    assert (lat.topic[drifted] >= cfg.n_topics).all()
    assert {syn.ALL_SHAPES[s] for s in lat.shape[drifted]} <= set(DRIFT_SHAPES)
    assert {syn.ALL_SHAPES[s] for s in lat.shape[~drifted]} <= set(SHAPES)
    assert {syn.ALL_BACKGROUNDS[b] for b in lat.background[drifted]} <= set(
        syn.DRIFT_BACKGROUNDS)
    # Everything else is the world without drift.
    assert (lat.topic[~drifted] == base.topic[~drifted]).all()
    assert (lat.colour == base.colour).all() and np.allclose(lat.pref[:, :8], base.pref)
    assert (lat.background[~drifted] == base.background[~drifted]).all()
    _, _, tags = syn.render_item(cfg, int(np.flatnonzero(drifted)[0]), lat)
    assert set(tags) & set(DRIFT_SHAPES)
    with pytest.raises(ValueError, match="before the world's period"):
        syn.as_of(cfg, lat, "2025-12-30")


def test_last_days_split_tests_the_newest_day_and_validates_the_one_before(spark):
    import datetime as dt

    from pipelines.config import SplitConfig
    from pipelines.split import split_events

    utc = dt.timezone.utc
    ts = [dt.datetime(2026, 1, d, h, tzinfo=utc) for d in (25, 26, 27) for h in (1, 23)]
    df = spark.createDataFrame([(1, i, t, 1) for i, t in enumerate(ts)],
                               "user_id long, item_id long, ts timestamp, label byte")
    out, bounds = split_events(df, SplitConfig(mode="last_days"))
    parts = [r.part for r in out.orderBy("item_id").collect()]
    assert parts == ["train", "train", "valid", "valid", "test", "test"]
    assert bounds["test_start"].startswith("2026-01-27T00:00:00")


def test_pairs_window_keeps_the_last_days_of_the_training_part(spark):
    import datetime as dt

    from pipelines.pairs import recent

    t0 = dt.datetime(2026, 1, 1, 12, tzinfo=dt.timezone.utc)
    df = spark.createDataFrame([(1, d, t0 + dt.timedelta(days=d), 1) for d in range(10)],
                               "user_id long, item_id long, ts timestamp, label byte")
    assert sorted(r.item_id for r in recent(df, 3).collect()) == [7, 8, 9]
    assert recent(df, None).count() == 10


def test_backfill_refuses_a_backwards_range():
    rc, _ = _qarm("backfill", "--from", D2, "--to", D1, "--no-progress")
    assert rc == 2


# ----------------------------------------------------------------------------- the job


@pytest.fixture(scope="module")
def daily_root(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("daily") / "q"
    rc, out = _qarm("backfill", "--from", D1, "--to", D2, "--no-progress", *_sets(root))
    assert rc == 0, out
    return root


def test_a_later_day_embeds_only_new_items_keeps_the_codebook_and_warm_starts(daily_root):
    from feature_store.facts import (CandidatesFacts, CodesFacts, DailyPlanFacts,
                                     EmbeddingFacts, PredictionsFacts)

    e1 = _facts(daily_root, D1, "embed", "item_embeddings")[1]["metrics"]
    e2 = _facts(daily_root, D2, "embed", "item_embeddings")[1]["metrics"]
    assert e1["kept"] == 0 and e1["embedded"] == e1["items_in"]
    new = e2["items_in"] - e1["items_in"]
    assert new > 0 and e2["embedded"] == new and e2["kept"] == e1["items_in"]
    plan: DailyPlanFacts = _facts(daily_root, D2, "drift", "daily_plan")[0]
    assert not plan.refit and plan.new_items == new and plan.previous_ds == D1
    c1: CodesFacts = _facts(daily_root, D1, "quantize", "item_codes")[0]
    c2: CodesFacts = _facts(daily_root, D2, "quantize", "item_codes")[0]
    assert c1.fitted and not c2.fitted and c2.codebook_version == c1.codebook_version
    a1 = _facts(daily_root, D1, "align", "aligned_item_embeddings")[0]
    a2: EmbeddingFacts = _facts(daily_root, D2, "align", "aligned_item_embeddings")[0]
    assert a2.encoder_version == a1.encoder_version
    p1: PredictionsFacts = _facts(daily_root, D1, "train", "ranker_predictions")[0]
    p2: PredictionsFacts = _facts(daily_root, D2, "train", "ranker_predictions")[0]
    assert p1.warm_started == () and p2.warm_started == ("codes",)
    cand: CandidatesFacts = _facts(daily_root, D2, "retrieve", "candidates")[0]
    assert cand.warm_started == ("codes",)
    # Every item of the day has embeddings and codes (kept + new).
    for stage, table in (("embed", "item_embeddings"), ("quantize", "item_codes")):
        assert _facts(daily_root, D2, stage, table)[1]["metrics"] is not None


def test_rerunning_a_day_is_idempotent(daily_root):
    from jobs.state import RunState

    before = len(RunState(daily_root / "state.db").rows(D2))
    rc, out = _qarm("run", "--ds", D2, "--no-progress", *_sets(daily_root))
    assert rc == 0, out
    assert len(RunState(daily_root / "state.db").rows(D2)) == before    # every stage skipped
    assert "skipped" in out and " done " not in out


def test_refit_on_request_bumps_the_codebook_and_trains_from_scratch(daily_root):
    from feature_store.facts import CodesFacts, DailyPlanFacts, PredictionsFacts

    rc, out = _qarm("run", "--ds", D2, "--until", "train", "--refit", "--no-progress",
                    *_sets(daily_root))
    assert rc == 0, out
    plan: DailyPlanFacts = _facts(daily_root, D2, "drift", "daily_plan")[0]
    assert plan.refit and "--refit" in plan.reason
    c1 = _facts(daily_root, D1, "quantize", "item_codes")[0]
    codes: CodesFacts = _facts(daily_root, D2, "quantize", "item_codes")[0]
    assert codes.fitted and codes.codebook_version != c1.codebook_version
    preds: PredictionsFacts = _facts(daily_root, D2, "train", "ranker_predictions")[0]
    assert preds.warm_started == () and preds.codebook_version == codes.codebook_version


def test_new_items_of_new_topics_trigger_a_refit(spark, tmp_path):
    from feature_store.facts import DailyPlanFacts

    root = tmp_path / "q"
    drift = [f"world.drift_ds={D2}"]
    rc, out = _qarm("run", "--ds", D1, "--until", "quantize", "--no-progress",
                    *_sets(root, *drift))
    assert rc == 0, out
    rc, out = _qarm("run", "--ds", D2, "--until", "drift", "--no-progress",
                    *_sets(root, *drift))
    assert rc == 0, out
    plan: DailyPlanFacts = _facts(root, D2, "drift", "daily_plan")[0]
    assert plan.refit and plan.reason.startswith("drift"), plan


def test_refit_and_the_daily_job_need_each_other():
    from jobs.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="daily.incremental"):
        load_config(None, ["daily.refit=true"])
    with pytest.raises(ConfigError, match="tune_text_layers"):
        load_config(None, ["daily.incremental=true", "align.tune_text_layers=1"])
    with pytest.raises(ConfigError, match="warm_days"):
        load_config(None, ["daily.warm_days=0"])
    with pytest.raises(ConfigError, match="window_days"):
        load_config(None, ["pairs.window_days=0"])
    with pytest.raises(ConfigError, match="drift_topics"):
        load_config(None, ["world.drift_ds=2026-01-28", "world.drift_topics=9"])
