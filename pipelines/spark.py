"""The Spark session every job shares.

On one machine the session runs ``local[*]`` with its warehouse under ``<work_dir>`` and the
JVM's output in ``<log_dir>/spark.log`` (not on the console, where only progress, reports and
errors belong). Under ``spark-submit`` the submitted master and settings win: only unset values
are filled in, and the JVM's output stays where the cluster sends it.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

from pipelines.config import SparkConfig

log = logging.getLogger(__name__)


class SparkUnavailable(RuntimeError):
    """Spark cannot start (no Java, or the session failed to launch)."""


def get_spark(cfg: SparkConfig, work_dir: str | Path, log_dir: str | Path | None = None):
    """Return the active session or start one configured from ``cfg``.

    ``work_dir`` holds the warehouse, scratch space and Derby files. Started here (not under
    ``spark-submit``), the driver JVM's output, the Python workers' stderr included, goes to
    ``<log_dir>/spark.log`` (default ``<work_dir>/logs``) instead of the console."""
    from pyspark import SparkConf, SparkContext
    from pyspark.java_gateway import launch_gateway
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    if not os.environ.get("JAVA_HOME") and shutil.which("java") is None:
        raise SparkUnavailable("Spark needs Java 17: install a JDK or set JAVA_HOME")
    work = Path(work_dir).resolve()
    logs = Path(log_dir).resolve() if log_dir is not None else work / "logs"
    work.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    # Python workers must run the same interpreter (the project's venv) as the driver.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    settings = {
        "spark.app.name": cfg.app_name,
        "spark.sql.shuffle.partitions": str(cfg.shuffle_partitions),
        # Partition counts that do not depend on how many executor cores happen to be registered
        # when a job starts (file splits and AQE otherwise follow the live core count): the same
        # input then gives the same files, and content hashes, locally and on any cluster.
        "spark.default.parallelism": str(cfg.shuffle_partitions),
        "spark.sql.files.minPartitionNum": str(cfg.shuffle_partitions),
        # AQE would merge small shuffle partitions by sizes and timing: keep the configured count.
        "spark.sql.adaptive.coalescePartitions.enabled": "false",
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(cfg.arrow_batch_size),
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MILLIS",
        "spark.sql.warehouse.dir": str(work / "warehouse"),
        "spark.local.dir": str(work / "tmp"),
        "spark.ui.enabled": "false",
        # Spark's stage bars would interleave with the stages' own progress bars.
        "spark.ui.showConsoleProgress": "false",
        "spark.python.worker.reuse": "true",
        "spark.driver.extraJavaOptions": f"-Dderby.system.home={work}",
    }
    submitted = launched_by_spark_submit()
    if not submitted:
        settings["spark.master"] = cfg.master
        settings["spark.driver.memory"] = cfg.driver_memory
    settings.update(cfg.conf)
    conf = SparkConf(loadDefaults=submitted)
    for k, v in settings.items():
        if not submitted or not conf.contains(k):   # under spark-submit, submitted values win
            conf.set(k, v)
    log_path = logs / "spark.log"
    try:
        if submitted:
            SparkContext.getOrCreate(conf)
        else:
            with open(log_path, "ab") as out:
                gateway = launch_gateway(conf, popen_kwargs={"stdout": out, "stderr": out})
            SparkContext(conf=conf, gateway=gateway)
        spark = SparkSession.builder.getOrCreate()
    except Exception as e:  # the JVM's failure text is long; keep its first line
        raise SparkUnavailable(f"Spark failed to start: {str(e).splitlines()[0]} "
                               f"(JVM log: {log_path})") from e
    spark.sparkContext.setLogLevel("WARN")
    log.info("spark %s master=%s; JVM log %s", spark.version, spark.sparkContext.master,
             log_path)
    return spark


def launched_by_spark_submit() -> bool:
    """spark-submit starts the JVM first and hands the Python driver a gateway port; then the
    submitted ``--master`` and ``--driver-memory`` must not be overridden by our defaults."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def by_item(df, partitions: int):
    """``df`` in ``partitions`` partitions by item id, sorted by item id within each.

    Model outputs depend (at the 1e-6 level) on which rows share a forward pass; a round-robin
    repartition would make that depend on the input files' row order, and the embeddings, the
    codes and every ranker trained on them would differ between runs of the same inputs."""
    return df.repartition(partitions, "item_id").sortWithinPartitions("item_id")
