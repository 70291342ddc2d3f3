"""Model weights as run artifacts (safetensors), and their versions in the model registry."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from pipeline.tracking.client import client


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
    from safetensors.torch import save_file  # deferred: safetensors.torch imports torch

    directory, _, filename = artifact_path.rpartition("/")
    if not filename.endswith(".safetensors"):
        raise ValueError(f"artifact_path {artifact_path!r} must end with .safetensors")
    with tempfile.TemporaryDirectory(prefix="pipeline-weights-") as tmp:
        local = Path(tmp) / filename
        save_file(_detached_tensors(state_dict), str(local))
        client(uri).log_artifact(run_id, str(local), directory or None)
    return f"runs:/{run_id}/{artifact_path}"


def register_model(uri: str, run_id: str, artifact_path: str, name: str) -> int:
    """Register the run's artifact as a new version of model ``name``; returns the version."""
    registry = client(uri)
    try:
        registry.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = registry.create_model_version(
        name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id
    )
    return int(version.version)
