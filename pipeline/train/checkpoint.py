"""Checkpoint files: tensors in safetensors, the rest in JSON; nothing is ever unpickled.

A checkpoint directory holds ``model.safetensors`` (the raw weights), ``ema.safetensors`` (the
EMA weights), ``optimizer.safetensors`` (per-parameter optimizer state, keyed by parameter name)
and ``state.json`` (step, MLflow run id, the plan). Ray Train uploads the directory to storage
only after it is complete, so a crash while writing never replaces the latest valid checkpoint.
A checkpoint holding a NaN or Inf is refused before anything is written: resuming from it could
only produce NaN. The upload is retried through a storage outage (``upload_with_retries``); what
still fails names the checkpoint's URL.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file, save_file

from pipeline.data.storage import StorageError, call_with_retries, read_bytes

STATE_FILE = "state.json"
# The weights files of a checkpoint folder, by which weights they hold (pipeline.tracking
# WEIGHTS: "ema" or "raw").
WEIGHTS_FILES = {"ema": "ema.safetensors", "raw": "model.safetensors"}


@contextlib.contextmanager
def staging_dir() -> Iterator[str]:
    """A fresh local directory, removed afterwards, to assemble a checkpoint in."""
    directory = tempfile.mkdtemp(prefix="nfnet-ckpt-")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


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


def upload_with_retries(url: str) -> Callable[[Any, str], Any]:
    """A ``checkpoint_upload_fn`` for ``ray.train.report``: Ray Train's own upload, retried.

    Each try already rides out ~10 s of refused connections (botocore's retries); the storage
    layer's 5 tries with backoff stretch that to about a minute of outage. A failure that is
    not transient (disk full, read-only, access denied) or outlasts the tries raises a
    StorageError naming ``url`` and removes the partial folder where it can: Ray Train never
    registered it, so a restart cannot pick it anyway.
    """
    from ray.train import get_context

    label = f"checkpoint.storage_url {url}"

    def upload(checkpoint, name: str):
        storage = get_context().get_storage()
        try:
            return call_with_retries(
                label, lambda: storage.persist_current_checkpoint(checkpoint, name)
            )
        except StorageError as exc:
            path = storage.build_checkpoint_path_from_name(name)
            with contextlib.suppress(Exception):
                storage.storage_filesystem.delete_dir(path)
            raise StorageError(
                label,
                f"writing the checkpoint failed ({exc.reason}); the previous checkpoint stays "
                "the latest",
            ) from exc

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
