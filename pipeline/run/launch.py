"""The Ray Train launch shared by pretraining, finetuning and experiments.

The driver connects to Ray (``RAY_ADDRESS``, as under ``ray job submit``, or a local cluster on
127.0.0.1), creates or re-opens the run's MLflow run, and runs a ``TorchTrainer`` whose workers
each run a :class:`pipeline.train.trainer.Trainer`. The MLflow run id is stored next to the Ray
Train checkpoints, so the same command run again after the driver died resumes the same run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from mlflow import MlflowClient

from pipeline.config import RunConfig, absolute_sqlite_uri, to_yaml
from pipeline.data.storage import atomic_write_bytes, read_bytes, url_exists
from pipeline.run.ray_cluster import connect_ray
from pipeline.tracking import TAG_KIND, create_run, end_run
from pipeline.train.plan import Plan

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"


@dataclass(frozen=True)
class LaunchResult:
    """What a finished launch produced."""

    run_id: str
    run_name: str
    checkpoint_url: str | None
    metrics: dict[str, Any]


def default_run_name(config: RunConfig, kind: str, origin: dict[str, Any] | None = None) -> str:
    """``tracking.run_name``, or a hash of config and origin: same command, same run."""
    if config.tracking.run_name:
        return config.tracking.run_name
    settings = config.model_dump(mode="json")
    settings["train"].pop("stop_after")  # stopping early and resuming is the same run
    # Neither changes the data or the parameters (pipeline.data.streams): the same command on
    # another worker count resumes the same run.
    settings["scaling"].pop("num_workers")
    settings["scaling"].pop("elastic_resize_interval_s")
    settings["data"].pop("loader_workers")
    settings["tracking"].pop("uri")  # the same store, however its path is written
    identity = {"config": settings, "origin": {k: v for k, v in (origin or {}).items() if v}}
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode())
    return f"{kind}-{config.model.name}-{digest.hexdigest()[:8]}"


def storage_target(url: str, storage_options: dict[str, Any]) -> tuple[str, Any]:
    """Ray Train's ``storage_path`` and ``storage_filesystem`` for a file:// or s3:// URL."""
    if url.startswith("file://") or "://" not in url:
        return os.path.abspath(url.removeprefix("file://")), None
    if storage_options:
        # A custom endpoint or credentials: hand Ray the fsspec filesystem through pyarrow.
        import fsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        protocol, _, path = url.partition("://")
        filesystem = fsspec.filesystem(protocol, **ray_storage_options(protocol, storage_options))
        return path, PyFileSystem(FSSpecHandler(filesystem))
    return url, None


# Ray Train writes its controller's checkpoint snapshot itself, with botocore's retries only;
# their default (5 attempts, "legacy" backoff from a random base under 1 s) gives up within
# seconds. Ten attempts in "standard" mode back off up to 20 s each: a run rides out an S3
# outage of over a minute.
RAY_S3_RETRIES = {"max_attempts": 10, "mode": "standard"}


def ray_storage_options(protocol: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """``storage_options`` for the filesystem Ray Train writes through: on S3, botocore's
    retries raised to ``RAY_S3_RETRIES`` unless the options set their own."""
    if protocol not in ("s3", "s3a"):
        return storage_options
    config = dict(storage_options.get("config_kwargs") or {})
    config.setdefault("retries", RAY_S3_RETRIES)
    return {**storage_options, "config_kwargs": config}


def run_url(config: RunConfig, run_name: str) -> str:
    """The URL of this run's folder in checkpoint storage."""
    return f"{config.checkpoint.storage_url.rstrip('/')}/{run_name}"


def open_mlflow_run(
    config: RunConfig, plan: Plan, run_name: str, tags: dict[str, str]
) -> tuple[str, str | None]:
    """Re-open the run recorded in storage for ``run_name`` or create a new one.

    Returns the run id and the status the run had (``None`` for a new run).
    """
    marker = f"{run_url(config, run_name)}/{RUN_ID_FILE}"
    options = config.checkpoint.storage_options
    if url_exists(marker, options):
        run_id = read_bytes(marker, options).decode().strip()
        client = MlflowClient(config.tracking.uri)
        status = client.get_run(run_id).info.status
        if status != "FINISHED":
            client.update_run(run_id, status="RUNNING")
        return run_id, status
    params = config.flat() | {f"plan.{key}": value for key, value in plan.as_dict().items()}
    run_id = create_run(
        config.tracking.uri,
        config.tracking.experiment,
        run_name,
        params,
        to_yaml(config),
        tags=tags,
    )
    atomic_write_bytes(marker, run_id.encode(), options)
    return run_id, None


def open_run_and_connect(
    config: RunConfig, plan: Plan, run_name: str, tags: dict[str, str]
) -> tuple[str, str | None]:
    """``open_mlflow_run``, and Ray joined or started unless the run has finished already.

    A new run's MLflow run opens in a thread while Ray starts: each takes seconds (MLflow's
    first use of a database creates its tables; a local cluster starts a dozen processes) and
    neither needs the other. A run that exists is looked up first: a finished one starts
    nothing.
    """
    marker = f"{run_url(config, run_name)}/{RUN_ID_FILE}"
    new_run = not url_exists(marker, config.checkpoint.storage_options)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="open-mlflow-run") as pool:
        opening = pool.submit(open_mlflow_run, config, plan, run_name, tags)
        if new_run:
            connect_ray(config.scaling.ray_address)
        run_id, previous = opening.result()
    if not new_run and previous != "FINISHED":
        connect_ray(config.scaling.ray_address)
    return run_id, previous


def launch(
    config: RunConfig,
    plan: Plan,
    *,
    kind: str,
    tags: dict[str, str] | None = None,
    init: dict[str, Any] | None = None,
) -> LaunchResult:
    """Train ``plan`` on the Ray cluster; return the MLflow run id and the final metrics."""
    import ray.train
    from ray.train.torch import TorchTrainer

    # deferred: the worker module imports DeepSpeed and the models (seconds)
    from pipeline.train.worker import train_loop_per_worker

    # Workers (and Ray jobs) run in directories of their own: a SQLite path must be absolute.
    config.tracking.uri = absolute_sqlite_uri(config.tracking.uri)
    run_name = default_run_name(config, kind, {"tags": tags, "init": init})
    run_tags = {TAG_KIND: kind, **(tags or {})}
    run_id, previous = open_run_and_connect(config, plan, run_name, run_tags)
    if previous == "FINISHED":
        log.info(f"run {run_name} (MLflow {run_id}) has already finished; nothing to do")
        return LaunchResult(run_id, run_name, None, {})
    if previous is not None:
        log.info(f"resuming run {run_name} (MLflow {run_id}, was {previous})")
    storage_path, filesystem = storage_target(
        config.checkpoint.storage_url, config.checkpoint.storage_options
    )
    scaling = config.scaling
    resources = {"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "plan": plan.as_dict(),
            "run_id": run_id,
            "run_url": run_url(config, run_name),
            "init": init,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,  # (min, max): Ray Train's elastic scaling
            use_gpu=scaling.use_gpu,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=scaling.elastic_resize_interval_s,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoint.keep),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:
        end_run(config.tracking.uri, run_id, status="FAILED")
        failure = getattr(exc, "controller_failure", None)  # ray.train's ControllerError
        if isinstance(failure, OSError):
            # The controller's own writes (its checkpoint records) go to the run's folder; its
            # error (pyarrow's) names no path.
            raise RuntimeError(
                f"checkpoint.storage_url {run_url(config, run_name)}: Ray Train's controller "
                f"could not write its checkpoint records there: {failure}"
            ) from exc
        raise
    metrics = dict(result.metrics or {})
    stopped = metrics.get("step", plan.total_steps) < plan.total_steps
    end_run(config.tracking.uri, run_id, status="KILLED" if stopped else "FINISHED")
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    return LaunchResult(run_id, run_name, checkpoint, metrics)
