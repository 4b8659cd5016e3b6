"""`make airflow-check`: the Airflow DAG file loads, matches the project's DAG, and runs a day.

Run with the Airflow virtualenv's Python (``.venv-airflow``, built by the make target from
``jobs/airflow/requirements.txt``); the project's own ``.venv`` runs the tasks. In a fresh
``AIRFLOW_HOME`` (SQLite) it

1. loads ``jobs/airflow`` into a ``DagBag`` and fails on any import error;
2. compares the DAG's tasks and edges with ``qarm dag --json`` computed by the project's
   environment for the same config, and checks the schedule, retries and that every task passes
   ``{{ ds }}`` through;
3. runs ``airflow dags test qarm_daily <ds>`` for one day of a tiny synthetic world (every task
   runs its stage: spark-submit, torchrun, Python) and checks the project's run state: every
   stage done for that ds.

Prints a JSON summary with the wall time of each step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DAG_ID = "qarm_daily"
#: One day of a tiny world: small enough for minutes on 2 cores.
TINY = ["world.n_items=120", "world.n_users=40", "world.impressions_per_user=30",
        "world.video_frames=3", "world.image_size=24", "world.video_size=16",
        "spark.shuffle_partitions=2", "ingest.image_partitions=2", "encoder.image_size=32",
        "encoder.dim=16", "align.epochs=2", "pairs.min_support=1", "quantize.rq.codes=8",
        "quantize.rq.levels=2", "quantize.vq.k=5", "train.batch_size=256", "train.epochs=1",
        "train.model.dim=8", "train.model.mlp=[32]", "registry.bootstrap=200"]

DUMP_DAG = """
import json, sys
from airflow.models.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1], include_examples=False)
dag = bag.dags.get(sys.argv[2])
tasks = {} if dag is None else {
    t.task_id: {"upstream": sorted(t.upstream_task_ids), "retries": t.retries,
                "command": t.bash_command} for t in dag.tasks}
print(json.dumps({"import_errors": {k: str(v) for k, v in bag.import_errors.items()},
                  "found": dag is not None,
                  "schedule": None if dag is None else str(getattr(dag, "schedule", None)),
                  "tasks": tasks}))
"""


def run(cmd, env, **kw) -> subprocess.CompletedProcess:
    t0 = time.time()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, **kw)
    res.seconds = time.time() - t0
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-4000:] + res.stderr[-6000:])
        raise SystemExit(f"failed ({res.returncode}): {' '.join(map(str, cmd))[:300]}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project-python", default=str(REPO / ".venv" / "bin" / "python"))
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--ds", default="2026-01-31")
    ap.add_argument("--keep", action="store_true", help="keep the temporary AIRFLOW_HOME")
    args = ap.parse_args(argv)
    # Absolute (not resolved: the venv's python is a symlink): tasks run in other folders.
    args.project_python = os.path.abspath(args.project_python)
    args.config = os.path.abspath(args.config)
    home = Path(tempfile.mkdtemp(prefix="qarm-airflow-"))
    root = home / "qarm"
    sets = TINY + [f"paths.root={root}", f"mlflow.tracking_uri=sqlite:///{root}/mlflow.db"]
    env = {**os.environ, "AIRFLOW_HOME": str(home),
           "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "jobs" / "airflow"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "QARM_REPO": str(REPO),
           "QARM_PYTHON": args.project_python, "QARM_CONFIG": args.config,
           "QARM_SET": " ".join(sets), "QARM_SPARK_MASTER": "local[2]",
           "QARM_RETRY_DELAY_S": "5"}
    summary = {"airflow_home": str(home)}
    try:
        overrides = [a for s in sets for a in ("--set", s)]
        expected = json.loads(run([args.project_python, str(REPO / "jobs" / "cli.py"), "dag",
                                   "--json", "--config", args.config, *overrides], env).stdout)
        airflow = str(Path(sys.executable).parent / "airflow")
        run([airflow, "db", "migrate"], env)
        loaded = run([sys.executable, "-c", DUMP_DAG, str(REPO / "jobs" / "airflow"), DAG_ID],
                     env)
        got = json.loads(loaded.stdout.strip().splitlines()[-1])
        summary["load_seconds"] = round(loaded.seconds, 1)
        assert not got["import_errors"], got["import_errors"]
        assert got["found"], f"no DAG {DAG_ID} in jobs/airflow"
        want = {n["stage"]: n["upstream"] for n in expected}
        have = {t: v["upstream"] for t, v in got["tasks"].items()}
        assert have == want, f"Airflow tasks/edges {have} != the project's DAG {want}"
        assert "@daily" in got["schedule"] or "1 day" in got["schedule"], got["schedule"]
        for t, v in got["tasks"].items():
            assert v["retries"] >= 1 and "{{ ds }}" in v["command"], (t, v)
            engine = next(n["engine"] for n in expected if n["stage"] == t)
            assert ("spark-submit" in v["command"]) == (engine == "spark"), (t, v["command"])
        summary["tasks"] = len(have)
        summary["edges"] = sum(len(u) for u in have.values())
        test = run([airflow, "dags", "test", DAG_ID, args.ds], env, timeout=3600)
        summary["dags_test_seconds"] = round(test.seconds, 1)
        status = run([args.project_python, str(REPO / "jobs" / "cli.py"), "status", "--ds",
                      args.ds, *overrides], env).stdout
        done = {line.split()[1] for line in status.splitlines()[1:]
                if len(line.split()) > 2 and line.split()[2] == "done"}
        assert done == set(want), f"stages not done for {args.ds}: {set(want) - done}"
        summary["stages_done"] = sorted(done)
    finally:
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
