"""Checkpoint files: tensors in safetensors, the rest in JSON; nothing is ever unpickled.

A checkpoint directory holds ``model.safetensors`` (the raw weights), ``ema.safetensors`` (the
EMA weights), ``optimizer.safetensors`` (per-parameter optimizer state, keyed by parameter name)
and ``state.json`` (step, MLflow run id, the plan). A checkpoint holding a NaN or Inf is refused
before anything is written: resuming from it could only produce NaN.

Rank 0 stages each checkpoint into a local folder at the step boundary (``stage``: the tensors
are written out before training touches them again), then hands it to Ray Train
(``Uploads.report``), whose upload thread — in the background under ``checkpoint.async_upload``,
while training goes on — has a child process at ``checkpoint.upload_nice`` copy it
(``persist``), and registers it as the restart point only once the upload completed: a crash
or a failed upload never makes a half checkpoint the one a restart picks. The upload is retried
through a storage outage; what still fails names the checkpoint's URL. The metrics up to the
checkpoint's step reach MLflow before the upload starts, and the milestone the finetune
scheduler watches only after it completed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file, save_file

from pipeline.data.storage import StorageError, call_with_retries, is_local, read_bytes
from pipeline.train.upload import copy_in_child

STATE_FILE = "state.json"
# The weights files of a checkpoint folder, by which weights they hold (pipeline.tracking
# WEIGHTS: "ema" or "raw").
WEIGHTS_FILES = {"ema": "ema.safetensors", "raw": "model.safetensors"}


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}


def optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's per-parameter tensors as ``{"param.name/state_key": tensor}``."""
    tensors = {}
    for name, parameter in model.named_parameters():
        for key, value in optimizer.state.get(parameter, {}).items():
            if torch.is_tensor(value):
                tensors[f"{name}/{key}"] = value
    return tensors


class NonfiniteCheckpointError(ValueError):
    """A checkpoint was refused because a tensor in it holds NaN or Inf."""


def check_finite(files: dict[str, dict[str, torch.Tensor]], step: Any) -> None:
    """Raise NonfiniteCheckpointError naming the file and tensor holding a NaN or Inf."""
    for file, tensors in files.items():
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise NonfiniteCheckpointError(
                    f"refusing to write the checkpoint of step {step}: {file} tensor {name!r} "
                    "holds NaN or Inf; the previous checkpoint stays the latest"
                )


def save(directory: str, model, optimizer, ema, state: dict[str, Any]) -> None:
    """Write one complete checkpoint into ``directory`` (nothing if a tensor is not finite)."""
    path = Path(directory)
    files = {
        WEIGHTS_FILES["raw"]: _cpu(model.state_dict()),
        WEIGHTS_FILES["ema"]: _cpu(ema.module.state_dict()),
        "optimizer.safetensors": _cpu(optimizer_tensors(model, optimizer)),
    }
    check_finite(files, state.get("step"))
    for file, tensors in files.items():
        save_file(tensors, path / file)
    (path / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True))


def load(directory: str, model, optimizer, ema) -> dict[str, Any]:
    """Restore model, EMA and optimizer state from ``directory``; return ``state.json``."""
    path = Path(directory)
    device = next(model.parameters()).device
    model.load_state_dict(load_file(path / WEIGHTS_FILES["raw"], device=str(device)))
    ema.module.load_state_dict(load_file(path / WEIGHTS_FILES["ema"], device=str(device)))
    parameters = dict(model.named_parameters())
    for key, value in load_file(path / "optimizer.safetensors", device=str(device)).items():
        name, _, state_key = key.rpartition("/")
        if name not in parameters:
            raise KeyError(f"checkpoint {directory}: optimizer state for unknown parameter {name}")
        optimizer.state[parameters[name]][state_key] = value
    return json.loads((path / STATE_FILE).read_text())


def stage(model, optimizer, ema, state: dict[str, Any]) -> str:
    """Write one checkpoint into a fresh local folder and return it: a copy of weights, optimizer
    state and EMA at this step boundary, which training may change again as soon as this
    returns. Nothing is left behind when writing fails (or a tensor is not finite)."""
    directory = tempfile.mkdtemp(prefix="nfnet-ckpt-")
    try:
        save(directory, model, optimizer, ema, state)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return directory


def check_stored(storage, staged: str, name: str) -> None:
    """Raise ConnectionError unless every file of the ``staged`` folder (flat) is in
    ``storage`` under ``name`` at its full size, as Ray Train's filesystem (the one a restart
    reads) lists it: registered, a folder short of a file would be a half checkpoint chosen by
    the next restart."""
    from pyarrow.fs import FileSelector, FileType

    path = storage.build_checkpoint_path_from_name(name)
    infos = storage.storage_filesystem.get_file_info(FileSelector(path, allow_not_found=True))
    stored = {info.base_name: info.size for info in infos if info.type == FileType.File}
    local = {file.name: file.stat().st_size for file in Path(staged).iterdir()}
    short = sorted(file for file, size in local.items() if stored.get(file) != size)
    if short:
        raise ConnectionError(f"the upload ended with {short} missing or incomplete in storage")


def persist(
    storage, checkpoint, name: str, url: str, storage_options: dict | None = None, nice: int = 0
):
    """Store the staged ``checkpoint`` where Ray Train's ``storage`` (a ``StorageContext``)
    keeps checkpoint ``name``, from a child process at CPU priority ``nice``
    (``pipeline.train.upload``); returns the stored checkpoint for Ray Train to register.

    Each file is retried through a storage outage (each try already rides out ~10 s of refused
    connections with botocore's retries; the storage layer's 5 tries with backoff stretch that
    to about a minute) and checked for its size. A failure that is not transient (disk full,
    read-only, access denied) or outlasts the tries raises a StorageError naming ``url`` and
    removes the partial folder where it can: Ray Train never registered it, so a restart cannot
    pick it anyway.
    """
    import ray.train

    label = f"checkpoint.storage_url {url}"
    path = storage.build_checkpoint_path_from_name(name)
    # The folder Ray Train lists: a local path, or the bucket path under the URL's protocol.
    target = path if is_local(url) else f"{url.partition('://')[0]}://{path}"
    try:
        copy_in_child(checkpoint.path, target, storage_options or {}, nice)
        call_with_retries(label, lambda: check_stored(storage, checkpoint.path, name))
    except StorageError as exc:
        with contextlib.suppress(Exception):
            storage.storage_filesystem.delete_dir(path)
        raise StorageError(
            label,
            f"writing the checkpoint failed ({exc.reason}); the previous checkpoint stays "
            "the latest",
        ) from exc
    return ray.train.Checkpoint(path=path, filesystem=storage.storage_filesystem)


class Upload:
    """One checkpoint on its way to storage; ``wait()`` returns once it is stored."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.seconds: float | None = None
        self.error: BaseException | None = None
        self._done = threading.Event()

    def finished(self, seconds: float | None = None, error: BaseException | None = None) -> None:
        """Record the outcome (the upload's seconds, or why it failed) and wake the waiters."""
        self.seconds, self.error = seconds, error
        self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the outcome (True once there is one); raise the upload's failure."""
        if not self._done.wait(timeout):
            return False
        if self.error is not None:
            raise self.error
        return True


def upload_job(
    upload: Upload,
    store: Callable[[], Any],
    logger=None,
    milestone: Callable[[], None] | None = None,
):
    """Run one upload: send the run's queued metrics (every step up to the checkpoint is in
    MLflow before the checkpoint can become the restart point), ``store()`` it, then log
    ``checkpoint/upload_seconds`` and the ``milestone``; the outcome goes to ``upload``."""
    tick = time.perf_counter()
    try:
        if logger is not None:
            logger.flush()
        stored = store()
        seconds = time.perf_counter() - tick
        if logger is not None:
            logger.log_metrics({"checkpoint/upload_seconds": seconds}, step=upload.step)
        if milestone is not None:
            milestone()
    except BaseException as exc:
        upload.finished(error=exc)
        raise
    upload.finished(seconds)
    return stored


class Uploads:
    """Rank 0's checkpoints on their way to storage, reported to Ray Train one at a time.

    Ray Train uploads in one background thread per worker, in order; ``wait()`` before staging
    the next checkpoint keeps at most one staged folder waiting on local disk, and turns a
    failed upload into an error of the training loop at once.
    """

    def __init__(self, config, run_id: str | None, logger=None, milestones: bool = True) -> None:
        self.background = config.checkpoint.async_upload
        self.storage_options = config.checkpoint.storage_options
        self.nice = config.checkpoint.upload_nice
        self.tracking_uri, self.run_id, self.logger = config.tracking.uri, run_id, logger
        self.milestones = milestones and logger is not None
        self.last: Upload | None = None

    def wait(self) -> None:
        """Wait for the last upload to finish; raise its failure."""
        if self.last is not None:
            self.last.wait()

    def milestone(self, step: int, url: str) -> Callable[[], None]:
        """The checkpoint milestone of ``step`` (``pipeline.tracking.log_checkpoint_event``)."""
        # deferred: mlflow takes seconds to import, and only rank 0 logs
        from pipeline.tracking import log_checkpoint_event

        return lambda: log_checkpoint_event(self.tracking_uri, self.run_id, step, url)

    def report(
        self, step: int, metrics: dict[str, Any], staged: str | None, name: str, url: str
    ) -> Upload | None:
        """``ray.train.report`` on every rank (a barrier); rank 0 passes its ``staged`` folder,
        which Ray Train removes once it is stored. Returns that checkpoint's Upload."""
        import ray.train
        from ray.train import CheckpointUploadMode

        checkpoint = upload = store_fn = None
        if staged is not None:
            upload = self.last = Upload(step)
            checkpoint = ray.train.Checkpoint.from_directory(staged)
            milestone = self.milestone(step, url) if self.milestones else None

            def store_fn(checkpoint, name: str):
                storage = ray.train.get_context().get_storage()
                store = partial(persist, storage, checkpoint, name, url, self.storage_options)
                try:
                    return upload_job(upload, partial(store, self.nice), self.logger, milestone)
                except BaseException:
                    shutil.rmtree(staged, ignore_errors=True)  # Ray removes it after a success
                    raise

        mode = CheckpointUploadMode.ASYNC if self.background else CheckpointUploadMode.SYNC
        try:
            ray.train.report(
                metrics,
                checkpoint=checkpoint,
                checkpoint_dir_name=name,
                checkpoint_upload_mode=mode,
                delete_local_checkpoint_after_upload=True,
                checkpoint_upload_fn=store_fn,
            )
        except BaseException as exc:  # never handed over: nobody else uploads or removes it
            if upload is not None:
                upload.finished(error=exc)
                shutil.rmtree(staged, ignore_errors=True)
            raise
        return upload


def fetch_weights(origin: dict[str, str], config) -> dict[str, torch.Tensor]:
    """The weights ``origin`` names (``pipeline.run.references``): an MLflow artifact URI of the
    chosen weights, or a checkpoint folder URL and which of its weights files (``origin
    ["weights"]``: "ema" or "raw")."""
    if origin["kind"] == "mlflow":
        import mlflow.artifacts

        local = mlflow.artifacts.download_artifacts(
            artifact_uri=origin["url"], tracking_uri=config.tracking.uri
        )
        if Path(local).is_dir():
            local = str(next(Path(local).rglob("*.safetensors")))
        return load_file(local)
    url = f"{origin['url'].rstrip('/')}/{WEIGHTS_FILES[origin['weights']]}"
    return safetensors_load(read_bytes(url, config.checkpoint.storage_options))


def load_backbone(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load every weight but the classifier (the task has its own head); names must match."""
    head = ("head.fc.weight", "head.fc.bias")
    backbone = {key: value for key, value in weights.items() if key not in head}
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    missing = [key for key in missing if key not in head]
    if missing or unexpected:
        raise ValueError(
            f"pretrained weights do not fit {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (is model.name the pretraining model?)"
        )
