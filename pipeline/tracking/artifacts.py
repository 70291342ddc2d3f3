"""Model weights as run artifacts (safetensors), and their versions in the model registry.

A finished run publishes both its final weights, as DM's experiment evaluates and reports both:
the raw weights (``weights/model.safetensors``) and their EMA (``weights/ema.safetensors``). A
registered model version holds the EMA weights — the ones DM's reported accuracies are of — and
says so in its ``pipeline.weights`` tag.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from pipeline.tracking.client import client

# Which weights of a run: "ema" (DM experiment_nfnets.py: use_ema=True, the reported numbers)
# or "raw" (the optimizer's final weights); the first is the default wherever one is chosen.
WEIGHTS = ("ema", "raw")
WEIGHTS_ARTIFACTS = {"ema": "weights/ema.safetensors", "raw": "weights/model.safetensors"}
TAG_WEIGHTS = "pipeline.weights"  # on a registered model version: which weights it holds
TAG_PRETRAIN_WEIGHTS = "pipeline.pretrain_weights"  # on a finetune: which weights it started from


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


def register_model(
    uri: str, run_id: str, artifact_path: str, name: str, tags: dict[str, str] | None = None
) -> int:
    """Register the run's artifact as a new version of model ``name`` (with ``tags`` on the
    version); returns the version."""
    registry = client(uri)
    try:
        registry.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = registry.create_model_version(
        name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id, tags=tags
    )
    return int(version.version)


def publish_weights(
    uri: str,
    run_id: str,
    weights: Mapping[str, Mapping[str, Any]],
    registered_model: str | None = None,
) -> int | None:
    """Log each of ``weights`` (``{"ema": state_dict, "raw": state_dict}``) as its artifact of
    ``WEIGHTS_ARTIFACTS``; register the EMA weights as a new version of ``registered_model``,
    tagged ``pipeline.weights=ema``. Returns that version (None without a registered model)."""
    unknown = set(weights) - set(WEIGHTS)
    if unknown or "ema" not in weights:
        raise ValueError(f"weights must hold 'ema' (and may hold 'raw'), got {sorted(weights)}")
    for kind, state_dict in weights.items():
        log_safetensors_weights(uri, run_id, state_dict, artifact_path=WEIGHTS_ARTIFACTS[kind])
    if not registered_model:
        return None
    tags = {TAG_WEIGHTS: "ema"}
    return register_model(uri, run_id, WEIGHTS_ARTIFACTS["ema"], registered_model, tags)
