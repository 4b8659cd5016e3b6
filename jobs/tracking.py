"""MLflow glue: one parent run per DAG run, one nested run per stage.

The tracking URI is, in order: ``mlflow.tracking_uri`` from the config, the
``MLFLOW_TRACKING_URI`` environment variable, or the embedded SQLite store
``<root>/mlflow.db`` with artifacts under ``<root>/mlartifacts``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Any, Iterator, Optional

from jobs.config import QarmConfig

log = logging.getLogger(__name__)


def tracking_uri(cfg: QarmConfig) -> str:
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{cfg.root / 'mlflow.db'}"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


class Tracker:
    """Thin wrapper so stages never import mlflow directly, and a disabled config costs nothing."""

    def __init__(self, cfg: QarmConfig):
        self.cfg = cfg
        self.enabled = cfg.mlflow.enabled
        self._mlflow = None
        if self.enabled:
            import mlflow

            # MLflow logs its SQLite schema migrations at INFO on first use: keep them out.
            logging.getLogger("alembic").setLevel(logging.WARNING)
            cfg.root.mkdir(parents=True, exist_ok=True)
            mlflow.set_tracking_uri(tracking_uri(cfg))
            exp = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
            if exp is None:
                artifact_location = None
                if tracking_uri(cfg).startswith("sqlite:///"):
                    artifact_location = (cfg.root / "mlartifacts").as_uri()
                mlflow.create_experiment(cfg.mlflow.experiment,
                                         artifact_location=artifact_location)
            mlflow.set_experiment(cfg.mlflow.experiment)
            self._mlflow = mlflow

    @contextlib.contextmanager
    def run(self, name: str, *, nested: bool = False, tags: Optional[dict] = None
            ) -> Iterator[Optional[str]]:
        if not self.enabled:
            yield None
            return
        with self._mlflow.start_run(run_name=name, nested=nested, tags=tags or {}) as r:
            yield r.info.run_id

    def params(self, params: dict) -> None:
        if self.enabled:
            flat = {_metric_name(k): ("" if v is None else str(v))[:6000]
                    for k, v in flatten(params).items()}
            self._mlflow.log_params(flat)

    def metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        if self.enabled:
            clean = {_metric_name(k): float(v) for k, v in flatten(metrics).items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if clean:
                self._mlflow.log_metrics(clean, step=step)

    def series(self, key: str, points) -> None:
        """One metric's curve, ``points`` as (step, value), in batches of MLflow's limit per
        request: logged one point at a time, a stage's curves cost a transaction each (4.4 s
        of the demo's ``train`` stage for its six arms' curves)."""
        if not self.enabled:
            return
        import time

        from mlflow.entities import Metric

        run = self._mlflow.active_run()
        if run is None:
            raise RuntimeError("series needs an active MLflow run")
        now = int(time.time() * 1000)
        name = _metric_name(key)
        metrics = [Metric(name, float(v), now, int(step)) for step, v in points]
        client = self._mlflow.MlflowClient()
        for a in range(0, len(metrics), 1000):
            client.log_batch(run.info.run_id, metrics=metrics[a:a + 1000])

    def tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            self._mlflow.set_tags({k: str(v)[:5000] for k, v in tags.items()})

    def artifact_dir(self, folder: str, name: str) -> None:
        if self.enabled:
            self._mlflow.log_artifacts(folder, name)

    def register_folder(self, folder: str, name: str, registered_name: str,
                        tags: Optional[dict] = None) -> Optional[str]:
        """Log ``folder`` (a model as files: weights plus config, never a pickle) under the
        current run's artifact ``name`` and register it as a new version of
        ``registered_name``, tagged with ``tags``; returns the version (None when tracking is
        off)."""
        if not self.enabled:
            return None
        mlflow = self._mlflow
        run = mlflow.active_run()
        if run is None:
            raise RuntimeError("register_folder needs an active MLflow run")
        mlflow.log_artifacts(folder, name)
        client = mlflow.MlflowClient()
        try:
            client.get_registered_model(registered_name)
        except mlflow.exceptions.MlflowException:
            client.create_registered_model(registered_name)
        v = client.create_model_version(
            registered_name, f"{run.info.artifact_uri}/{name}", run_id=run.info.run_id,
            tags={k: str(x)[:5000] for k, x in (tags or {}).items()})
        log.info("registered %s version %s (%s)", registered_name, v.version, name)
        return str(v.version)

    def artifact_text(self, text: str, name: str) -> None:
        if self.enabled:
            self._mlflow.log_text(text, name)


def _metric_name(key: str) -> str:
    """MLflow allows alphanumerics, ``_ - . / :`` and spaces in metric and parameter names
    (``codes+frozen`` becomes ``codes_plus_frozen``)."""
    return re.sub(r"[^\w\-./: ]", "_", key.replace("@", "_at_").replace("+", "_plus_"))
