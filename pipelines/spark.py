"""The Spark session every job shares, and Arrow ↔ Spark schema helpers.

On one machine the session runs ``local[*]`` with its warehouse under ``<root>/spark``. Under
``spark-submit`` the submitted master and settings win: the builder only fills in what is unset.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys

import pyarrow as pa

from jobs.config import QarmConfig

log = logging.getLogger(__name__)


class SparkUnavailable(RuntimeError):
    """Spark cannot start (no Java, or the session failed to launch)."""


def get_spark(cfg: QarmConfig):
    """Return the active session or start one configured from ``cfg.spark``."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    if not os.environ.get("JAVA_HOME") and shutil.which("java") is None:
        raise SparkUnavailable("Spark needs Java 17: install a JDK or set JAVA_HOME")
    root = cfg.root
    (root / "spark").mkdir(parents=True, exist_ok=True)
    # Python workers must run the same interpreter (the project's venv) as the driver.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    b = (SparkSession.builder.appName(cfg.spark.app_name)
         .config("spark.sql.shuffle.partitions", str(cfg.spark.shuffle_partitions))
         .config("spark.sql.session.timeZone", "UTC")
         .config("spark.sql.execution.arrow.pyspark.enabled", "true")
         .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.spark.arrow_batch_size))
         .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MILLIS")
         .config("spark.sql.warehouse.dir", str(root / "spark" / "warehouse"))
         .config("spark.local.dir", str(root / "spark" / "tmp"))
         .config("spark.ui.enabled", "false")
         .config("spark.ui.showConsoleProgress", "true")
         .config("spark.python.worker.reuse", "true")
         .config("spark.driver.extraJavaOptions", f"-Dderby.system.home={root / 'spark'}"))
    if not launched_by_spark_submit():
        b = b.master(cfg.spark.master).config("spark.driver.memory", cfg.spark.driver_memory)
    for k, v in cfg.spark.conf.items():
        b = b.config(k, v)
    try:
        spark = b.getOrCreate()
    except Exception as e:  # the JVM's failure text is long; keep its first line
        raise SparkUnavailable(f"Spark failed to start: {str(e).splitlines()[0]}") from e
    spark.sparkContext.setLogLevel("WARN")
    log.info("spark %s master=%s", spark.version, spark.sparkContext.master)
    return spark


def launched_by_spark_submit() -> bool:
    """spark-submit starts the JVM first and hands the Python driver a gateway port; then the
    submitted ``--master`` and ``--driver-memory`` must not be overridden by our defaults."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def arrow_schema_to_spark(schema: pa.Schema):
    """A Spark StructType for an Arrow schema (the types this project's tables use)."""
    from pyspark.sql import types as T

    def conv(t: pa.DataType):
        if pa.types.is_int64(t):
            return T.LongType()
        if pa.types.is_int32(t):
            return T.IntegerType()
        if pa.types.is_int16(t):
            return T.ShortType()
        if pa.types.is_int8(t):
            return T.ByteType()
        if pa.types.is_float32(t):
            return T.FloatType()
        if pa.types.is_float64(t):
            return T.DoubleType()
        if pa.types.is_boolean(t):
            return T.BooleanType()
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return T.StringType()
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return T.BinaryType()
        if pa.types.is_timestamp(t):
            return T.TimestampType()
        if pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
            return T.ArrayType(conv(t.value_type))
        raise TypeError(f"no Spark type for Arrow {t}")

    return T.StructType([T.StructField(f.name, conv(f.type), f.nullable) for f in schema])
