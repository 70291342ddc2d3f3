"""Preflight: the one place that proves a run can start.

``prepare`` reads the config, resolves it into a plan and checks every URL the run will touch
before anything is started: each URL has a scheme its library serves (fsspec for data and
checkpoints, MLflow for tracking), and what must exist exists (the dataset's ``_info.json``, a
writable checkpoint folder, a tracking server or database that answers, the Ray cluster). A run
that resumes keeps the global batch, lr and AGC λ of its checkpoints (another worker count is
fine). The dry run stops after these checks. Each refusal is a ConfigError naming the key and
the URL.

Storage and Ray clients retry a refused connection for a minute or more (s3fs and botocore each
retry, Ray waits for its GCS), which is right mid-run and wrong for a typo at start-up: an
endpoint is first probed with one TCP connect.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import fsspec
import yaml

from pipeline.config import ConfigError, RunConfig, load_config
from pipeline.data.info import read_info
from pipeline.data.storage import (
    StorageError,
    atomic_write_bytes,
    find_files,
    read_bytes,
    remove_url,
)
from pipeline.data.streams import Layout
from pipeline.run.launch import run_url
from pipeline.run.ray_cluster import check_token
from pipeline.tracking import TrackingError, check_tracking_uri, redact
from pipeline.tracking.redact import redact_text
from pipeline.train.batches import SYNTHETIC, describe_dataset
from pipeline.train.checkpoint import STATE_FILE
from pipeline.train.plan import Plan, deepspeed_config, make_plan, resume_conflict

log = logging.getLogger(__name__)

ENDPOINT_TIMEOUT_S = 5.0  # one TCP connect: a dead endpoint fails in seconds, not minutes
# The tracking-store schemes MLflow registers: its file store (a folder, "" or file://), its
# REST stores, and SQLAlchemy's database engines (a driver may follow: postgresql+psycopg2).
MLFLOW_SCHEMES = frozenset(
    {"", "file", "http", "https", "databricks", "databricks-uc", "uc"}
    | {"sqlite", "postgresql", "mysql", "mssql"}
)
DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def check_endpoint(key: str, address: str | None) -> None:
    """Raise ConfigError naming ``key`` unless ``address`` (URL or host:port) accepts a
    connection."""
    if not address or address in ("auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    default_port = {"http": 80, "https": 443, "ray": 10001}.get(parts.scheme)
    try:
        host, port = parts.hostname, parts.port or default_port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise ConfigError(f"{key}: {address!r} is not a URL or host:port with a port")
    try:
        socket.create_connection((host, port), timeout=ENDPOINT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(f"{key}: {address} does not accept connections ({exc})") from None


def check_storage_endpoint(section: str, storage_options: dict) -> None:
    """A custom object-store endpoint in ``storage_options`` answers."""
    client_kwargs = storage_options.get("client_kwargs") or {}
    if isinstance(client_kwargs, dict):
        key = f"{section}.storage_options.client_kwargs.endpoint_url"
        check_endpoint(key, client_kwargs.get("endpoint_url"))
    check_endpoint(f"{section}.storage_options.endpoint_url", storage_options.get("endpoint_url"))


def url_protocols(url: str) -> list[str]:
    """The protocols of an fsspec URL, chained ones first (``simplecache::s3://…``); ``""``
    for a plain path."""
    *chained, target = url.split("::")
    protocols = [part.split("://", 1)[0] for part in chained]
    return [*protocols, target.split("://", 1)[0] if "://" in target else ""]


def check_storage_url(key: str, url: str) -> None:
    """``url`` is a plain path or names a protocol fsspec serves."""
    known = set(fsspec.available_protocols())
    unknown = [protocol for protocol in url_protocols(url) if protocol and protocol not in known]
    if unknown:
        raise ConfigError(
            f"{key}: {redact(url)}: no filesystem serves {unknown[0]}:// URLs; use a path, "
            "file://, s3:// or another protocol fsspec knows"
        )


def check_dataset_url(key: str, url: str, allow_pipe: bool) -> None:
    """A dataset URL: ``synthetic://``, a consented ``pipe:`` command, or a storage URL."""
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise ConfigError(
                f"{key}: {url!r} is a pipe: URL, which runs a shell command; "
                "set data.allow_pipe=true only if you trust the config"
            )
        return
    if not url.startswith(SYNTHETIC):
        check_storage_url(key, url)


def check_tracking_scheme(uri: str) -> None:
    """``tracking.uri`` names a store MLflow serves; a database server answers."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower().split("+")[0]
    if scheme not in MLFLOW_SCHEMES:
        raise ConfigError(
            f"tracking.uri: {redact(uri)}: MLflow has no tracking store for {scheme}:// URIs; "
            "use sqlite:///PATH.db, http(s)://SERVER, a folder, or a postgresql://, mysql:// or "
            "mssql:// database"
        )
    if scheme in DATABASE_PORTS and parts.hostname:
        check_endpoint("tracking.uri", f"{parts.hostname}:{parts.port or DATABASE_PORTS[scheme]}")


def resolve(config: RunConfig) -> Plan:
    """Read the dataset's shape and resolve the plan; bad input raises ConfigError/StorageError."""
    data = config.data
    check_dataset_url("data.train_url", data.train_url, data.allow_pipe)
    check_storage_endpoint("data", data.storage_options)
    try:
        # A brace pattern of shards no _info.json lists takes its size and classes from here.
        shape = describe_dataset(
            data.train_url,
            data.storage_options,
            allow_pipe=data.allow_pipe,
            train_samples=data.train_samples,
            num_classes=config.model.num_classes,
        )
    except (ValueError, StorageError) as exc:
        raise ConfigError(f"data.train_url: {exc}") from exc
    if shape.train_samples == 0:  # named before the validation split, which then matters not
        raise ConfigError(f"data.train_url: {redact(data.train_url)} holds no training samples")
    val_samples = shape.val_samples
    if data.val_url and not data.train_url.startswith(SYNTHETIC):
        check_dataset_url("data.val_url", data.val_url, data.allow_pipe)
        try:
            info = read_info(data.val_url, data.storage_options, allow_pipe=data.allow_pipe)
            val_samples = info.split("validation").num_samples
        except (ValueError, StorageError) as exc:
            raise ConfigError(f"data.val_url: {exc}") from exc
    elif val_samples == 0 and not data.train_url.startswith(SYNTHETIC):
        raise ConfigError(
            f"data.val_url: {redact(data.train_url)} has no validation split; set data.val_url "
            "to a shard set that has one"
        )
    return make_plan(config, shape.num_classes, shape.train_samples, val_samples)


def plan_run(config: RunConfig) -> Plan:
    """The resolved plan, its DeepSpeed config built once to prove the two agree."""
    plan = resolve(config)
    deepspeed_config(config, plan)
    return plan


def check_reachable(config: RunConfig) -> None:
    """The checkpoint storage takes a write and the MLflow store answers (data: ``resolve``)."""
    check_tracking_scheme(config.tracking.uri)
    storage, options = config.checkpoint.storage_url, config.checkpoint.storage_options
    check_storage_url("checkpoint.storage_url", storage)
    check_storage_endpoint("checkpoint", options)
    probe = f"{storage.rstrip('/')}/.write-probe"
    try:
        atomic_write_bytes(probe, b"ok", options)
        remove_url(probe, options)
    except StorageError as exc:
        raise ConfigError(f"checkpoint.storage_url: {exc}") from exc
    try:
        check_tracking_uri(config.tracking.uri)
    except TrackingError as exc:
        raise ConfigError(f"tracking.uri: {exc}") from exc


def check_resume(config: RunConfig, plan: Plan) -> None:
    """A run named by ``tracking.run_name`` resumes only with what its newest checkpoint was
    trained with but the worker count (``pipeline.train.plan.RESUME_KEEPS``). An unnamed run's
    name hashes its config, so a change there starts a new run instead."""
    name = config.tracking.run_name
    if not name:
        return
    folder, options = run_url(config, name), config.checkpoint.storage_options
    states = [
        path
        for path in find_files(folder, options)
        if path.startswith("step_") and path.endswith(f"/{STATE_FILE}")
    ]
    if not states:
        return
    newest = f"{folder}/{max(states)}"  # step_<9 digits>: the newest sorts last
    saved = json.loads(read_bytes(newest, options)).get("plan", {})
    conflict = resume_conflict(saved, plan)
    if conflict:
        raise ConfigError(f"tracking.run_name={name!r} resumes {redact(newest)}: {conflict}")


def check_cluster(config: RunConfig) -> None:
    """The Ray cluster answers and, when GPUs are asked for, has one per worker."""
    scaling = config.scaling
    address = scaling.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        import ray

        check_endpoint("scaling.ray_address", address)
        try:
            check_token(address)
        except ConfigError as exc:  # a refused token, or no Ray GCS at the address
            raise ConfigError(f"scaling.ray_address: {exc}") from None
        try:
            # A connection of its own, closed again: a driver connection left open across the
            # launch makes Ray print every worker log line twice.
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            gpus = ray.cluster_resources().get("GPU", 0)
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError, …
            raise ConfigError(
                f"scaling.ray_address: cannot reach Ray at {address}: {redact_text(str(exc))}"
            ) from None
        finally:
            ray.shutdown()
        where = f"the Ray cluster at {address}"
    else:
        import torch

        gpus, where = torch.cuda.device_count(), "this machine (no Ray address given)"
    least = scaling.worker_range[0]  # an elastic run starts once its minimum fits
    if scaling.use_gpu and gpus < least:
        raise ConfigError(
            f"scaling.use_gpu: {least} workers need {least} GPUs but "
            f"{where} has {int(gpus)}; set scaling.use_gpu=false or point scaling.ray_address "
            "at a GPU cluster"
        )


def describe_plan(config: RunConfig, plan: Plan) -> str:
    """The dry run's report: resolved config, DeepSpeed config, scaling plan."""
    own = plan.train_streams // plan.num_workers
    layout = Layout(0, plan.num_workers, plan.accumulation_steps, plan.train_streams)
    low, high = config.scaling.worker_range
    elastic = f" (elastic: restarts on {low} to {high} workers)" if low < high else ""
    return "\n".join(
        [
            "# resolved config\n"
            + yaml.safe_dump(redact(config.model_dump(mode="json")), sort_keys=False),
            "# DeepSpeed config\n" + json.dumps(deepspeed_config(config, plan), indent=2),
            "# scaling plan\n"
            f"global batch {plan.global_batch} = micro-batch {plan.micro_batch} × accumulation "
            f"{plan.accumulation_steps} × workers {plan.num_workers}{elastic}\n"
            f"data: {plan.train_streams} canonical streams (any worker count dividing "
            f"{plan.global_batch // plan.micro_batch} resumes with the same data), {own} per "
            f"worker, {layout.loader_processes(config.data.loader_workers)} loader processes "
            "each\n"
            f"peak lr {plan.peak_lr:g}  AGC λ {plan.clipping}  warm-up {plan.warmup_steps} steps\n"
            f"{plan.train_samples} training samples: {plan.steps_per_epoch} steps/epoch, "
            f"{plan.total_steps} steps in all\n"
            f"model {plan.model}: {plan.train_resolution} px train, {plan.test_resolution} px "
            f"test, dropout {plan.drop_rate}, stochastic depth {plan.stochdepth_rate}, "
            f"RandAugment {plan.randaugment_layers}×{plan.randaugment_magnitude}, "
            f"padding {plan.padding}, precision {plan.precision}",
        ]
    )


def prepare(
    config_path: str | Path, overrides: list[str], dry_run: bool = False
) -> tuple[RunConfig, Plan]:
    """Config, plan and every check; bad input raises ConfigError naming the file and the key.

    With ``dry_run`` the plan is logged before the checks that need the network.
    """
    try:
        config = load_config(config_path, overrides).with_absolute_paths()
    except ConfigError as exc:
        raise ConfigError(f"bad config: {exc}") from None
    try:
        plan = plan_run(config)
        if dry_run:
            log.info(describe_plan(config, plan))
        check_reachable(config)
        check_resume(config, plan)
        check_cluster(config)
    except (ConfigError, StorageError) as exc:
        raise ConfigError(f"{config_path}: {exc}") from None
    return config, plan
