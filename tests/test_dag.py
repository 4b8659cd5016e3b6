"""The qarm CLI and DAG: idempotent re-runs, --force, config-driven re-runs, status, errors."""

from __future__ import annotations

import mlflow
import pytest

from jobs.cli import main
from jobs.config import load_config
from jobs.dag import Dag
from tests.conftest import tiny_world_overrides


def _args(root, *extra, until="ingest"):
    out = []
    for o in tiny_world_overrides(root):
        out += ["--set", o]
    if until and "--until" not in extra:
        extra = (*extra, "--until", until)  # the DAG's mechanics; later stages elsewhere
    return [*out, "--ds", "2026-01-31", "--no-progress", *extra]


def _outputs(capsys):
    text = capsys.readouterr().out
    return {line.split()[0]: line.split()[1] for line in text.splitlines()
            if line.startswith(("world ", "ingest "))}, text


def test_rerun_skips_force_reruns_and_config_change_reruns_only_downstream(spark, tmp_path,
                                                                           capsys):
    root = tmp_path / "q"
    assert main(["run", *_args(root)]) == 0
    status, text = _outputs(capsys)
    assert status == {"world": "done", "ingest": "done"}
    assert "items" in text and "rows_in" in text

    cfg = load_config(None, tiny_world_overrides(root))
    dag = Dag(cfg)
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
