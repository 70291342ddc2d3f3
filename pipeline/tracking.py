"""MLflow tracking: the run created in the driver, the rank-0 logger in the workers, lineage tags.

One training run is one MLflow run, even across Ray Train restarts: the driver creates it with
``create_run`` and hands the id to the workers, whose rank 0 logs through a ``RunLogger``. A
synchronous call to a tracking server costs ~0.1 s (design.md), so ``RunLogger`` queues metrics
and a background thread sends them with ``log_batch``; training never waits on the network.

Secrets never reach MLflow: every param, tag and the config artifact go through ``redact``.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

log = logging.getLogger(__name__)
T = TypeVar("T")

TAG_PARENT = "mlflow.parentRunId"  # MLflow's own tag: the UI nests the run under this parent
TAG_PRETRAIN_RUN = "pipeline.pretrain_run_id"
TAG_PRETRAIN_STEP = "pipeline.pretrain_step"
TAG_TASK = "pipeline.task"
TAG_KIND = "pipeline.kind"  # pretrain | finetune | scratch
TAG_CHECKPOINT_PREFIX = "pipeline.checkpoint."
CHECKPOINT_METRIC = "checkpoint_step"
KINDS = ("pretrain", "finetune", "scratch")

REDACTED = "***"
# A key is secret when its name contains one of these words (case-insensitive). Beyond the obvious
# ones: "auth" (HTTP Authorization), "passwd", and the signature of pre-signed URLs (S3
# X-Amz-Signature, Azure SAS "sig").
_SECRET_KEY = re.compile(
    r"key|secret|token|password|passwd|credential|session|auth|signature|^sig$", re.I
)

# MLflow's server-side limits (mlflow/utils/validation.py in MLflow 3.x).
MAX_PARAM_VALUE_CHARS = 6000
MAX_TAG_VALUE_CHARS = 8000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_KEY_CHARS = 250
_KEY_FORBIDDEN = re.compile(r"[^\w\-. /:]")  # MLflow allows alphanumerics, _ - . space / :

# MLflow error codes that a retry cannot fix: the request itself is wrong.
_PERMANENT_ERRORS = set(
    "INVALID_PARAMETER_VALUE BAD_REQUEST RESOURCE_DOES_NOT_EXIST RESOURCE_ALREADY_EXISTS "
    "INVALID_STATE PERMISSION_DENIED UNAUTHENTICATED".split()
)


class TrackingError(RuntimeError):
    """The tracking URI or a run cannot be used; the message names the URI or run."""


def is_secret_key(name: str) -> bool:
    """Whether a config key's name says its value is a credential."""
    return bool(_SECRET_KEY.search(str(name)))


def _redact_url(text: str) -> str:
    # "s3://user:password@host/x?X-Amz-Signature=..." keeps user, host and path; loses the
    # password and every secret-named query value (pre-signed URLs carry credentials there).
    if "://" not in text or ("@" not in text and "?" not in text):
        return text
    try:
        parts = urlsplit(text)
        password = parts.password
    except ValueError:
        return text
    if password is not None:
        port = f":{parts.port}" if parts.port else ""
        parts = parts._replace(netloc=f"{parts.username}:{REDACTED}@{parts.hostname or ''}{port}")
    if parts.query:
        query = parse_qsl(parts.query, keep_blank_values=True)
        parts = parts._replace(
            query=urlencode([(k, REDACTED if is_secret_key(k) else v) for k, v in query], safe="*")
        )
    return urlunsplit(parts)


def redact(obj: Any) -> Any:
    """A copy of ``obj`` with every secret-named key's value (and URL passwords) set to ``***``."""
    if isinstance(obj, Mapping):
        return {
            key: (REDACTED if value is not None else None) if is_secret_key(key) else redact(value)
            for key, value in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [redact(item) for item in obj]
    if isinstance(obj, str):
        return _redact_url(obj)
    return obj


def _safe_key(key: str) -> str:
    return _KEY_FORBIDDEN.sub("_", key)[:MAX_KEY_CHARS]


def _param_value(value: Any) -> str:
    text = str(value)
    if len(text) > MAX_PARAM_VALUE_CHARS:
        text = text[: MAX_PARAM_VALUE_CHARS - 3] + "..."
    return text


def flatten_params(config_dict: Mapping[str, Any]) -> dict[str, str]:
    """``{"data": {"storage_options": {"key": k}}}`` -> ``{"data.storage_options.key": "***"}``."""
    flat: dict[str, str] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping) and value:
                walk(value, f"{name}.")
            else:
                flat[_safe_key(name)] = _param_value({} if isinstance(value, Mapping) else value)

    walk(redact(config_dict), "")
    return flat


def resolve_tracking_uri(uri: str) -> str:
    """The URI with a relative SQLite path made absolute, so every process finds the same file."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = uri.removeprefix("sqlite:///")
        if path and path != ":memory:":
            return "sqlite:///" + str(Path(path).resolve())
    return uri


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Raise ``TrackingError`` if an HTTP server does not answer or a SQLite file is unwritable."""
    scheme = urlsplit(uri).scheme
    if scheme in ("http", "https"):
        health = uri.rstrip("/") + "/health"
        try:
            # urlopen raises HTTPError (a URLError) on any non-2xx answer.
            urllib.request.urlopen(health, timeout=timeout).close()
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingError(
                f"MLflow tracking server {uri} does not answer ({exc}); start it, or use a "
                "reachable server or a local file (sqlite:///mlflow.db) as the tracking URI"
            ) from None
        return
    path = _sqlite_path(uri)
    if path is None:
        return
    directory = path.resolve().parent
    if not directory.is_dir():
        raise TrackingError(f"tracking URI {uri}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise TrackingError(f"tracking URI {uri}: {path.resolve()} is not writable")


def _client(uri: str) -> MlflowClient:
    uri = resolve_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage != "active":
            raise TrackingError(
                f"MLflow experiment {name!r} at {uri} is deleted; restore it "
                f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) "
                "or choose another tracking.experiment"
            )
        return experiment.experiment_id
    location = None
    db = _sqlite_path(resolve_tracking_uri(uri))
    if db is not None:
        # MLflow's default artifact root is ./mlruns of the current directory; next to the
        # database instead, so Ray workers (other working dirs) and tests find the same files.
        slug = re.sub(r"[^\w.-]", "_", name)
        location = (db.parent / "mlartifacts" / slug).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # another driver created it first
            raise
        return client.get_experiment_by_name(name).experiment_id


def experiment_id(uri: str, name: str) -> str:
    """The id of the active experiment ``name``, created (artifacts next to SQLite) if missing."""
    return _experiment_id(_client(uri), uri, name)


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
    client = _client(uri)
    run_tags = {key: _tag_value(value) for key, value in redact(dict(tags or {})).items()}
    run = client.create_run(
        _experiment_id(client, uri, experiment), run_name=run_name, tags=run_tags
    )
    run_id = run.info.run_id
    try:
        flat = [Param(key, value) for key, value in flatten_params(params).items()]
        for start in range(0, len(flat), MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=flat[start : start + MAX_PARAMS_PER_BATCH])
        with tempfile.TemporaryDirectory(prefix="pipeline-config-") as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(yaml.safe_dump(redact(config_tree), sort_keys=False))
            client.log_artifact(run_id, str(path))
    except BaseException:
        client.set_terminated(run_id, "FAILED")  # a half-set-up run must not look alive
        raise
    return run_id


def _tag_value(value: Any) -> str:
    return str(value)[:MAX_TAG_VALUE_CHARS]


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run ended with ``status`` (FINISHED, FAILED or KILLED)."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"end_run: status must be FINISHED, FAILED or KILLED, not {status!r}")
    _client(uri).set_terminated(run_id, status)


def _is_transient(exc: BaseException) -> bool:
    return not (isinstance(exc, MlflowException) and exc.error_code in _PERMANENT_ERRORS)


def _with_retries(action: Callable[[], T], what: str, retries: int, backoff: float) -> T:
    attempt = 0
    while True:
        try:
            return action()
        except Exception as exc:
            if attempt >= retries or not _is_transient(exc):
                raise
            delay = min(backoff * 2**attempt, 30.0)
            attempt += 1
            log.warning("MLflow %s failed (%s); retry %d in %.2fs", what, exc, attempt, delay)
            time.sleep(delay)


class RunLogger:
    """Rank-0 metric logger: ``log_metrics`` only queues, a background thread sends batches."""

    def __init__(
        self,
        uri: str,
        run_id: str,
        *,
        flush_interval: float = 5.0,
        max_batch: int = MAX_METRICS_PER_BATCH,
        retries: int = 5,
        backoff: float = 0.5,
        resume_from_step: int | Mapping[str, int] | None = None,
    ) -> None:
        if not 0 < max_batch <= MAX_METRICS_PER_BATCH:
            raise ValueError(f"max_batch must be in 1..{MAX_METRICS_PER_BATCH}, got {max_batch}")
        self.uri, self.run_id = resolve_tracking_uri(uri), run_id
        self._client = _client(uri)
        self._flush_interval, self._max_batch = flush_interval, max_batch
        self._retries, self._backoff = retries, backoff
        self._resume_from = resume_from_step
        self._pending: list[Metric] = []
        self._in_flight = 0
        self._closed = False
        self._flush_requested = False
        self._wake = threading.Condition()
        self.sent_metrics = 0
        self.failed_metrics = 0
        self.dropped_resumed = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="mlflow-run-logger", daemon=True)
        self._thread.start()
        _open_loggers.add(self)

    def _already_logged(self, key: str, step: int) -> bool:
        limit = self._resume_from
        if isinstance(limit, Mapping):
            limit = limit.get(key)
        return limit is not None and step <= limit

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue ``metrics`` at ``step``; never blocks on the network, never raises."""
        timestamp = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            if self._already_logged(key, step):
                self.dropped_resumed += 1
                continue
            try:
                # A key MLflow rejects would make the server refuse the whole batch.
                batch.append(Metric(_safe_key(key), float(value), timestamp, int(step)))
            except (TypeError, ValueError) as exc:
                log.warning("metric %r at step %s is not a number (%s); not logged", key, step, exc)
        with self._wake:
            if self._closed:
                log.warning(
                    "RunLogger for run %s is closed; %d metrics dropped", self.run_id, len(batch)
                )
                return
            self._pending.extend(batch)
            if len(self._pending) >= self._max_batch:
                self._wake.notify_all()

    def _take(self) -> list[Metric] | None:
        with self._wake:
            while not self._pending and not self._closed:
                self._wake.wait()
            deadline = time.monotonic() + self._flush_interval
            # Wait for a full batch or the interval: fewer, larger requests to the server.
            while len(self._pending) < self._max_batch and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._flush_requested:
                    break
                self._wake.wait(remaining)
            if not self._pending:
                return None
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            self._in_flight = len(batch)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                if self._closed:
                    return
                continue
            try:
                self._call(self._client.log_batch, self.run_id, metrics=batch)
                sent, failed = len(batch), 0
            except Exception as exc:  # a tracking outage must not kill training
                sent, failed = 0, len(batch)
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "MLflow log_batch to %s failed; %d metrics of run %s lost: %s",
                    self.uri,
                    failed,
                    self.run_id,
                    self.last_error,
                )
            with self._wake:
                self.sent_metrics += sent
                self.failed_metrics += failed
                self._in_flight = 0
                self._wake.notify_all()

    def _call(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return _with_retries(
            lambda: method(*args, **kwargs), method.__name__, self._retries, self._backoff
        )

    def flush(self, timeout: float | None = None) -> bool:
        """Send everything queued; True when the queue drained within ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._wake:
            self._flush_requested = True
            self._wake.notify_all()
            try:
                while (self._pending or self._in_flight) and self._thread.is_alive():
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._wake.wait(remaining)
            finally:
                self._flush_requested = False
            return not self._pending and not self._in_flight

    def close(self, timeout: float | None = 60.0) -> bool:
        """Flush and stop the background thread; True when every queued metric was handled."""
        drained = self.flush(timeout)
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        _open_loggers.discard(self)
        self._thread.join(timeout=1.0 if drained else 0.0)
        if not drained:
            log.warning("RunLogger for run %s closed with metrics still unsent", self.run_id)
        return drained

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Upload a file or directory to the run (synchronous, retried; raises on failure)."""
        if not Path(local_path).exists():
            raise FileNotFoundError(f"log_artifact: {local_path} does not exist")
        self._call(self._client.log_artifact, self.run_id, local_path, artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (redacted; synchronous, retried; raises on failure)."""
        run_tags = [RunTag(key, _tag_value(value)) for key, value in redact(dict(tags)).items()]
        self._call(self._client.log_batch, self.run_id, tags=run_tags)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def last_logged_steps(uri: str, run_id: str) -> dict[str, int]:
    """The highest step logged so far for each metric of the run (read back after a restart)."""
    client = _client(uri)
    keys = client.get_run(run_id).data.metrics.keys()
    return {key: max(m.step for m in client.get_metric_history(run_id, key)) for key in keys}


def last_logged_step(uri: str, run_id: str, key: str | None = None) -> int | None:
    """The highest step logged for ``key`` (any metric when None); None when nothing was logged."""
    if key is None:
        steps = last_logged_steps(uri, run_id).values()
    else:
        steps = [m.step for m in _client(uri).get_metric_history(run_id, key)]
    return max(steps, default=None)


def _detached_tensors(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    # safetensors refuses tensors sharing storage (tied weights): copy only those.
    seen: set[int] = set()
    tensors = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen and tensor.numel():
            tensor = tensor.clone()
        seen.add(pointer)
        tensors[name] = tensor
    return tensors


def log_safetensors_weights(
    uri: str,
    run_id: str,
    state_dict: Mapping[str, Any],
    artifact_path: str = "weights/model.safetensors",
) -> str:
    """Upload ``state_dict`` as a safetensors artifact of the run; returns its ``runs:/`` URI."""
    from safetensors.torch import save_file

    directory, _, filename = artifact_path.rpartition("/")
    if not filename.endswith(".safetensors"):
        raise ValueError(f"artifact_path {artifact_path!r} must end with .safetensors")
    with tempfile.TemporaryDirectory(prefix="pipeline-weights-") as tmp:
        local = Path(tmp) / filename
        save_file(_detached_tensors(state_dict), str(local))
        _client(uri).log_artifact(run_id, str(local), directory or None)
    return f"runs:/{run_id}/{artifact_path}"


def register_model(uri: str, run_id: str, artifact_path: str, name: str) -> int:
    """Register the run's artifact as a new version of model ``name``; returns the version."""
    client = _client(uri)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id
    )
    return int(version.version)


def log_checkpoint_event(uri: str, run_id: str, step: int, url: str) -> None:
    """Record a checkpoint milestone on the run, so a scheduler finds it by reading MLflow only."""
    metric = Metric(CHECKPOINT_METRIC, float(step), int(time.time() * 1000), int(step))
    tag = RunTag(f"{TAG_CHECKPOINT_PREFIX}{int(step)}", _tag_value(redact(url)))
    _with_retries(
        lambda: _client(uri).log_batch(run_id, metrics=[metric], tags=[tag]),
        "log_checkpoint_event",
        retries=3,
        backoff=0.5,
    )


def list_checkpoints(uri: str, run_id: str) -> list[tuple[int, str]]:
    """``[(step, url), ...]`` of the run's checkpoint milestones, by step."""
    tags = _client(uri).get_run(run_id).data.tags
    found = []
    for key, value in tags.items():
        suffix = key.removeprefix(TAG_CHECKPOINT_PREFIX)
        if suffix != key and suffix.isdigit():
            found.append((int(suffix), value))
    return sorted(found)


def lineage_tags(
    kind: str,
    task: str | None = None,
    pretrain_run_id: str | None = None,
    pretrain_step: int | None = None,
) -> dict[str, str]:
    """The tags that place a run in the pretrain -> finetune lineage (for ``create_run``)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    tags = {TAG_KIND: kind}
    if task is not None:
        tags[TAG_TASK] = task
    if pretrain_run_id is not None:
        tags[TAG_PRETRAIN_RUN] = pretrain_run_id
        tags[TAG_PARENT] = pretrain_run_id  # the MLflow UI shows the finetune under its pretrain
    if pretrain_step is not None:
        tags[TAG_PRETRAIN_STEP] = str(int(pretrain_step))
    return tags


# Loggers not closed by their owner still send what they queued when the process exits normally.
_open_loggers: weakref.WeakSet[RunLogger] = weakref.WeakSet()


@atexit.register
def _close_open_loggers() -> None:
    for logger in list(_open_loggers):
        logger.close(timeout=10.0)
