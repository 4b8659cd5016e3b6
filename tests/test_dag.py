"""The qarm CLI and DAG: idempotent re-runs, --force, config-driven re-runs, status, errors."""

from __future__ import annotations

import argparse

import mlflow
import pytest

from jobs.cli import main
from jobs.config import load_config
from jobs.stages import build_dag
from tests.conftest import tiny_world_overrides


def _args(root, *extra, until="ingest"):
    out = []
    for o in tiny_world_overrides(root):
        out += ["--set", o]
    if until and "--until" not in extra:
        extra = (*extra, "--until", until)  # the DAG's mechanics; later stages elsewhere
    return [*out, "--ds", "2026-01-31", "--no-progress", *extra]


def _outputs(capsys, err=None):
    """(stage -> status, stdout) of the last command; ``err`` (a list) receives its stderr."""
    captured = capsys.readouterr()
    if err is not None:
        err.append(captured.err)
    text = captured.out
    return {line.split()[0]: line.split()[1] for line in text.splitlines()
            if line.startswith(("world ", "ingest "))}, text


def test_rerun_skips_force_reruns_and_config_change_reruns_only_downstream(spark, tmp_path,
                                                                           capsys):
    root = tmp_path / "q"
    assert main(["run", *_args(root)]) == 0
    err = []
    status, text = _outputs(capsys, err)
    assert status == {"world": "done", "ingest": "done"}
    assert "render items" not in err[0]        # --no-progress reaches the stages' own bars
    assert "items" in text and "rows_in" in text

    cfg = load_config(None, tiny_world_overrides(root))
    dag = build_dag(cfg)
    first = {r["stage"]: r["outputs"] for r in dag.status("2026-01-31")}

    assert main(["run", *_args(root)]) == 0
    status, _ = _outputs(capsys)
    assert status == {"world": "skipped", "ingest": "skipped"}
    assert {r["stage"]: r["outputs"] for r in dag.status("2026-01-31")} == first

    # A changed ingest setting re-runs ingest, not the world.
    assert main(["run", *_args(root, "--set", "ingest.min_image_side=4")]) == 0
    status, _ = _outputs(capsys)
    assert status == {"world": "skipped", "ingest": "done"}

    # If an output snapshot disappears, its stage runs again (and only it: world is unchanged).
    import shutil

    now = {r["stage"]: r["outputs"] for r in dag.status("2026-01-31")}
    shutil.rmtree(dag.store.resolve(now["ingest"]["items"]).path)
    assert main(["run", *_args(root, "--set", "ingest.min_image_side=4")]) == 0
    status, _ = _outputs(capsys)
    assert status == {"world": "skipped", "ingest": "done"}

    assert main(["run", *_args(root, "--force", "--until", "world")]) == 0
    status, _ = _outputs(capsys)
    assert status == {"world": "done"}
    after = {r["stage"]: r["outputs"] for r in dag.status("2026-01-31")}
    assert after["world"] != first["world"]  # new snapshots were written

    assert main(["status", "--set", f"paths.root={root}"]) == 0
    text = capsys.readouterr().out
    assert "2026-01-31" in text and "ingest" in text and "done" in text

    # Every stage logged a nested MLflow run under its DAG run.
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["qarm"], output_format="list")
    dags = [r for r in runs if r.data.tags.get("qarm.kind") == "dag"]
    stages = [r for r in runs if "qarm.stage" in r.data.tags]
    assert len(dags) == 5
    parents = {r.info.run_id for r in dags}
    assert all(r.data.tags["mlflow.parentRunId"] in parents for r in stages)
    ingest_done = [r for r in stages if r.data.tags["qarm.stage"] == "ingest"
                   and "qarm.skipped" not in r.data.tags]
    assert ingest_done and "events.in" in ingest_done[0].data.metrics


def test_only_needs_upstream_and_says_so(spark, tmp_path, capsys):
    assert main(["ingest", *_args(tmp_path / "q", until=None)]) == 2
    err = capsys.readouterr().err
    assert "needs 'raw_items' from stage 'world'" in err and "Traceback" not in err


def test_unknown_stage_and_bad_config_are_one_line_errors(tmp_path, capsys):
    assert main(["run", "--until", "nope", "--set", f"paths.root={tmp_path}"]) == 2
    assert "unknown stage" in capsys.readouterr().err
    assert main(["run", "--set", "world.n_itemz=3", "--set", f"paths.root={tmp_path}"]) == 2
    assert "did you mean 'world.n_items'" in capsys.readouterr().err


def test_help_lists_stages(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "world" in out and "ingest" in out and "status" in out


def test_every_subcommand_help_prints_and_shows_no_escaped_percent(capsys):
    # A subparser's description is printed as written (only help strings are %-formatted),
    # so a "95%%" there reached the user as "95%%".
    from jobs.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"run", "ablation", "compare"} <= set(sub.choices)
    for name in sub.choices:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "usage: qarm " + name in out and "%%" not in out, name


# ----------------------------------------------------------------------------- planning


def _noop(ctx):
    raise AssertionError("not run")


def test_a_new_stage_is_planned_after_the_stages_whose_outputs_it_reads():
    from jobs.dag import plan_order
    from jobs.stage import Stage
    from jobs.stages import STAGES

    cfg = load_config(None)
    # Listed first, reading what pairs and quantize_raw write: the order must come from I/O.
    report = Stage("pair_code_report", _noop, inputs=("item_pairs", "item_codes_raw"),
                   outputs=("pair_code_report",), config=(), help="")
    order = [s.name for s in plan_order((report, *STAGES), cfg)]
    assert order.index("pair_code_report") > order.index("pairs")
    assert order.index("pair_code_report") > order.index("quantize_raw")
    # Every stage comes after the producers of everything it reads; an opt-in stage that is
    # off (ground) is not planned.
    assert "ground" not in order and "drift" not in order
    daily = load_config(None, ["daily.incremental=true"])
    for c in (daily, cfg, load_config(None, ["ground.enabled=true",
                                             "encoder.video_highlight=true"])):
        order = [s.name for s in plan_order(STAGES, c)]
        produced_by = {t: s.name for s in STAGES if s.applies(c) for t in s.output_tables(c)}
        for s in STAGES:
            if s.applies(c):
                for t in s.input_tables(c):
                    assert order.index(produced_by[t]) < order.index(s.name), (s.name, t)
    assert order.index("ground") < order.index("embed")
    order = [s.name for s in plan_order(STAGES, daily)]
    assert order.index("embed") < order.index("drift") < order.index("align")
    # Without the synthetic world, world is not part of the DAG and ingest reads raw files.
    generic = load_config(None, ["source.kind=generic"])
    assert [s.name for s in plan_order(STAGES, generic)][0] == "ingest"


def test_bad_declarations_are_refused_with_the_reason():
    from jobs.dag import plan_order
    from jobs.stage import DagError, Stage

    cfg = load_config(None)
    a = Stage("a", _noop, inputs=("y",), outputs=("x",), config=(), help="")
    b = Stage("b", _noop, inputs=("x",), outputs=("y",), config=(), help="")
    with pytest.raises(DagError, match="cycle"):
        plan_order((a, b), cfg)
    c = Stage("c", _noop, inputs=(), outputs=("x",), config=(), help="")
    with pytest.raises(DagError, match="'a' and 'c' both write 'x'"):
        plan_order((Stage("a", _noop, (), ("x",), (), ""), c), cfg)
    with pytest.raises(DagError, match="reads 'nowhere', which no stage"):
        plan_order((Stage("d", _noop, ("nowhere",), (), (), ""),), cfg)


def _tiny_dag(tmp_path, reader_run):
    """Two stages on a real store: ``make`` writes t1 and t2, ``use`` declares t1 only."""
    import pyarrow as pa

    from jobs.dag import Dag
    from jobs.stage import Stage, StageReport

    def make(ctx):
        return StageReport({t: ctx.io.write_arrow(t, pa.table({"v": [1, 2]}))
                            for t in ("t1", "t2")})

    stages = (Stage("make", make, (), ("t1", "t2"), (), ""),
              Stage("use", reader_run, ("t1",), ("t3",), (), ""))
    cfg = load_config(None, [f"paths.root={tmp_path}", "mlflow.enabled=false"])
    return Dag(cfg, stages)


def test_the_dag_hands_the_progress_switch_to_every_stage(tmp_path):
    seen = []

    def use(ctx):
        import pyarrow as pa

        from jobs.stage import StageReport

        seen.append(ctx.progress)
        return StageReport({"t3": ctx.io.write_arrow("t3", pa.table({"v": [0]}))})

    dag = _tiny_dag(tmp_path, use)
    dag.run("2026-01-01", progress=False)
    dag.run("2026-01-01", progress=True, force=True)
    assert seen == [False, True]


def test_a_stage_reading_a_table_it_did_not_declare_fails_with_a_clear_error(tmp_path, capsys):
    import pyarrow as pa

    from jobs.stage import StageReport, UndeclaredTable

    def sneaky(ctx):
        ctx.io.arrow("t1")          # declared: fine
        ctx.io.arrow("t2")          # not declared
        return StageReport({"t3": ctx.io.write_arrow("t3", pa.table({"v": [0]}))})

    dag = _tiny_dag(tmp_path, sneaky)
    with pytest.raises(UndeclaredTable, match="stage 'use' read 't2', which it does not declare "
                                              r"as an input \(declared: t1\)"):
        dag.run("2026-01-01", progress=False)
    assert dag.state.last_success("2026-01-01", "make") is not None
    failed = [r for r in dag.state.rows("2026-01-01") if r["stage"] == "use"]
    assert failed[-1]["status"] == "failed" and "UndeclaredTable" in failed[-1]["error"]

    def writes_too_much(ctx):
        return StageReport({"t1": ctx.io.write_arrow("t1", pa.table({"v": [0]}))})

    with pytest.raises(UndeclaredTable, match="wrote 't1', which it does not declare"):
        _tiny_dag(tmp_path / "b", writes_too_much).run("2026-01-01", progress=False)


def test_declared_reads_are_exactly_the_skip_key_and_the_lineage(tmp_path):
    import pyarrow as pa

    from jobs.stage import StageReport

    def honest(ctx):
        n = ctx.io.arrow("t1").num_rows
        return StageReport({"t3": ctx.io.write_arrow("t3", pa.table({"n": [n]}))})

    dag = _tiny_dag(tmp_path, honest)
    first = dag.run("2026-01-01", progress=False)
    t1 = dag.store.get("t1")
    assert dag.store.get("t3").parents == (t1.ref,)
    assert [o.status for o in dag.run("2026-01-01", progress=False)] == ["skipped", "skipped"]
    # A new t1 re-runs its reader; forcing the producer writes new snapshots.
    dag.run("2026-01-01", only="make", force=True, progress=False)
    again = dag.run("2026-01-01", only="use", progress=False)
    assert again[0].status == "done" and again[0].outputs != first[1].outputs


def test_config_keys_mlflow_refuses_are_logged_under_clean_names(tmp_path):
    from jobs.tracking import Tracker

    cfg = load_config(None, [f"paths.root={tmp_path / 'q'}",
                             "train.tuned={codes+frozen: {sparse_lr: 0.3}}"])
    tracker = Tracker(cfg)
    with tracker.run("names") as run_id:
        tracker.params({"train": cfg.to_dict()["train"]})
        tracker.metrics({"codes+frozen.test.all.auc": 0.7})
    run = mlflow.get_run(run_id)
    assert run.data.params["train.tuned.codes_plus_frozen.sparse_lr"] == "0.3"
    assert run.data.metrics["codes_plus_frozen.test.all.auc"] == 0.7


def test_a_curve_is_logged_in_batches_as_one_metric_with_its_steps(tmp_path):
    from jobs.tracking import Tracker

    cfg = load_config(None, [f"paths.root={tmp_path / 'q'}"])
    tracker = Tracker(cfg)
    points = [(3 * i, 1.0 / (i + 1)) for i in range(2500)]       # more than one request holds
    with tracker.run("curve") as run_id:
        tracker.series("codes+frozen.train_loss", points)
        tracker.series("codes.valid_auc", [])
    history = mlflow.MlflowClient().get_metric_history(run_id, "codes_plus_frozen.train_loss")
    assert sorted((m.step, m.value) for m in history) == points
    Tracker(load_config(None, [f"paths.root={tmp_path / 'off'}", "mlflow.enabled=false"])
            ).series("x", points)                                  # tracking off: nothing


def test_the_scheduler_graph_is_the_dag_with_engines_and_upstream_edges(capsys):
    import json

    from jobs.cli import main
    from jobs.config import load_config
    from jobs.dag import plan_order, stage_graph
    from jobs.stages import STAGES

    cfg = load_config(None, [])
    graph = stage_graph(STAGES, cfg)
    assert [n["stage"] for n in graph] == [s.name for s in plan_order(STAGES, cfg)]
    by = {n["stage"]: n for n in graph}
    assert by["train"]["engine"] == "torch" and by["world"]["upstream"] == []
    assert {n["stage"] for n in graph if n["engine"] == "spark"} == {
        "ingest", "split", "embed", "pairs", "align", "quantize", "quantize_raw", "examples"}
    # Every upstream stage comes earlier and produces one of the stage's inputs.
    for i, n in enumerate(graph):
        earlier = {m["stage"] for m in graph[:i]}
        assert set(n["upstream"]) <= earlier, n
    assert "examples" in by["train"]["upstream"] and "evaluate" in by["promote"]["upstream"]
    assert main(["dag", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == graph


def test_a_stage_s_config_sections_can_depend_on_the_config(tmp_path):
    from jobs.stages import build_dag

    base = ["paths.root=" + str(tmp_path)]
    plain = build_dag(load_config(None, base))
    pretrain = plain.stage("pretrain")
    assert pretrain.config_sections(plain.cfg) == ("pretrain",)
    # The tagger does not read the encoder: an encoder change keeps its skip key.
    other = build_dag(load_config(None, [*base, "encoder.dim=32"]))
    assert other.config_hash(other.stage("pretrain")) == plain.config_hash(pretrain)
    # The video-text model reads the encoder's towers: then an encoder change retrains it.
    video = ["pretrain.video.enabled=true"]
    v1 = build_dag(load_config(None, [*base, *video]))
    v2 = build_dag(load_config(None, [*base, *video, "encoder.dim=32"]))
    assert v1.stage("pretrain").config_sections(v1.cfg) == ("pretrain", "encoder")
    assert v1.config_hash(v1.stage("pretrain")) != v2.config_hash(v2.stage("pretrain"))
