"""The daily qarm run as an Apache Airflow DAG: one task per stage of the project's own DAG.

Tasks and edges are generated at parse time from ``jobs.stages.STAGES`` and the config
(``jobs.dag.stage_graph``: the same order and dependencies ``qarm run`` uses), never written here
by hand. Each task runs one stage for the run's ``ds`` with the project's Python environment:

* Spark stages: ``spark-submit --master $QARM_SPARK_MASTER jobs/cli.py run --only <stage>``;
* the train stage: ``jobs/cli.py run --only train`` with ``train.launcher=torchrun`` (the stage
  prepares the data, starts the ranks with torchrun and registers the models);
* the others: ``jobs/cli.py run --only <stage>``.

Settings come from the environment of the Airflow workers (defaults in brackets):
``QARM_REPO`` (this checkout), ``QARM_PYTHON`` (``<repo>/.venv/bin/python``), ``QARM_CONFIG``
(``<repo>/configs/demo.yaml``), ``QARM_SET`` (extra ``key=value`` overrides, space separated),
``QARM_SPARK_MASTER`` (``local[*]``), ``QARM_SPARK_HOME`` (the Spark inside the project's
pyspark), ``QARM_RETRY_DELAY_S`` (600; two retries). Airflow itself runs in its own
virtualenv (it conflicts with the project's pins); this file needs only the repository on the
path, and ``pyarrow``, ``pyyaml`` and ``tqdm`` there (``jobs/airflow/requirements.txt``).
``make airflow-check`` builds that virtualenv, loads this DAG and runs it for one day of a tiny
world. ``qarm_daily.cron`` beside it is the same schedule without Airflow.
"""

from __future__ import annotations

import os
import shlex
import sys
from datetime import datetime, timedelta
from pathlib import Path

REPO = Path(os.environ.get("QARM_REPO", Path(__file__).resolve().parents[2]))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from airflow.providers.standard.operators.bash import BashOperator  # noqa: E402
from airflow.sdk import DAG  # noqa: E402

from jobs.config import load_config  # noqa: E402
from jobs.dag import stage_graph  # noqa: E402
from jobs.stages import STAGES  # noqa: E402

PYTHON = os.environ.get("QARM_PYTHON", str(REPO / ".venv" / "bin" / "python"))
CONFIG = os.environ.get("QARM_CONFIG", str(REPO / "configs" / "demo.yaml"))
SETS = shlex.split(os.environ.get("QARM_SET", ""))
SPARK_MASTER = os.environ.get("QARM_SPARK_MASTER", "local[*]")
#: The Spark installation: the cluster's, or (by default) the one in the project's pyspark.
SPARK_HOME = os.environ.get("QARM_SPARK_HOME") or (
    f"$({shlex.quote(PYTHON)} -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')")
RETRY_DELAY = timedelta(seconds=float(os.environ.get("QARM_RETRY_DELAY_S", "600")))
CLI = str(REPO / "jobs" / "cli.py")


def stage_command(stage: str, engine: str) -> str:
    """The shell command of one stage's task; ``{{ ds }}`` is Airflow's run date."""
    args = ["run", "--only", stage, "--ds", "{{ ds }}", "--config", CONFIG, "--no-progress"]
    for s in SETS:
        args += ["--set", s]
    if engine == "torch":
        args += ["--set", "train.launcher=torchrun"]
    tail = " ".join(shlex.quote(a) for a in [CLI, *args])
    if engine == "spark":
        py = shlex.quote(PYTHON)
        return (f'export SPARK_HOME="{SPARK_HOME}" PYSPARK_PYTHON={py} '
                f'PYSPARK_DRIVER_PYTHON={py}; "$SPARK_HOME/bin/spark-submit" '
                f"--master {shlex.quote(SPARK_MASTER)} {tail}")
    return f"{shlex.quote(PYTHON)} {tail}"


GRAPH = stage_graph(STAGES, load_config(CONFIG, SETS))

with DAG(
    dag_id="qarm_daily",
    description="qarm: ingest → embed → pairs → align → quantize → examples → train → "
                "evaluate → promote, for one ds",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": RETRY_DELAY,
                  "execution_timeout": timedelta(hours=6)},
    tags=["qarm"],
) as dag:
    tasks = {n["stage"]: BashOperator(task_id=n["stage"],
                                      bash_command=stage_command(n["stage"], n["engine"]))
             for n in GRAPH}
    for n in GRAPH:
        for up in n["upstream"]:
            tasks[up] >> tasks[n["stage"]]
