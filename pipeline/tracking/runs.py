"""One training run is one MLflow run: created by the driver, ended by the driver.

The driver creates the run with ``create_run`` (kept RUNNING) and hands its id to the Ray Train
workers, so restarts of the workers keep logging to the same run.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient
from mlflow.entities import Param
from mlflow.exceptions import MlflowException

from pipeline.tracking.client import client
from pipeline.tracking.lineage import ENDED_MLFLOW
from pipeline.tracking.redact import MAX_PARAMS_PER_BATCH, flatten_params, redact, tag_value
from pipeline.tracking.uri import TrackingError, resolve_tracking_uri, sqlite_path


def _experiment_id(mlflow_client: MlflowClient, uri: str, name: str) -> str:
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage != "active":
            raise TrackingError(
                f"MLflow experiment {name!r} at {uri} is deleted; restore it "
                f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) "
                "or choose another tracking.experiment"
            )
        return experiment.experiment_id
    location = None
    db = sqlite_path(resolve_tracking_uri(uri))
    if db is not None:
        # MLflow's default artifact root is ./mlruns of the current directory; next to the
        # database instead, so Ray workers (other working dirs) and tests find the same files.
        slug = re.sub(r"[^\w.-]", "_", name)
        location = (db.parent / "mlartifacts" / slug).as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=location)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # another driver created it first
            raise
        return mlflow_client.get_experiment_by_name(name).experiment_id


def experiment_id(uri: str, name: str) -> str:
    """The id of the active experiment ``name``, created (artifacts next to SQLite) if missing."""
    return _experiment_id(client(uri), uri, name)


def create_run(
    uri: str,
    experiment: str,
    run_name: str | None,
    params: Mapping[str, Any],
    config_yaml: str,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Create the run (and experiment), log redacted params and ``config.yaml``; keep it RUNNING."""
    try:
        config_tree = yaml.safe_load(config_yaml)
    except yaml.YAMLError as exc:
        raise ValueError(f"create_run: config_yaml is not valid YAML: {exc}") from None
    mlflow_client = client(uri)
    run_tags = {key: tag_value(value) for key, value in redact(dict(tags or {})).items()}
    run = mlflow_client.create_run(
        _experiment_id(mlflow_client, uri, experiment), run_name=run_name, tags=run_tags
    )
    run_id = run.info.run_id
    try:
        flat = [Param(key, value) for key, value in flatten_params(params).items()]
        for start in range(0, len(flat), MAX_PARAMS_PER_BATCH):
            mlflow_client.log_batch(run_id, params=flat[start : start + MAX_PARAMS_PER_BATCH])
        with tempfile.TemporaryDirectory(prefix="pipeline-config-") as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(yaml.safe_dump(redact(config_tree), sort_keys=False))
            mlflow_client.log_artifact(run_id, str(path))
    except BaseException:
        mlflow_client.set_terminated(run_id, "FAILED")  # a half-set-up run must not look alive
        raise
    return run_id


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run ended with ``status`` (FINISHED, FAILED or KILLED)."""
    if status not in ENDED_MLFLOW:
        raise ValueError(f"end_run: status must be FINISHED, FAILED or KILLED, not {status!r}")
    client(uri).set_terminated(run_id, status)


def last_logged_steps(uri: str, run_id: str) -> dict[str, int]:
    """The highest step logged so far for each metric of the run (read back after a restart)."""
    mlflow_client = client(uri)
    keys = mlflow_client.get_run(run_id).data.metrics.keys()
    return {key: max(m.step for m in mlflow_client.get_metric_history(run_id, key)) for key in keys}
