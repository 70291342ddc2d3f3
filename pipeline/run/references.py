"""``--from REF``: where a finetune starts, proved to exist before anything is started.

REF names the starting weights:
  - an MLflow run id (its latest checkpoint) or ``RUN_ID@STEP`` (the checkpoint of that step),
    also written ``runs:/RUN_ID``;
  - ``models:/NAME/VERSION``, a registered model version;
  - a checkpoint URL or path: a folder holding ``model.safetensors`` (file://, s3://, a path);
  - ``scratch``: random initialisation, the baseline.
A checkpoint, named directly or through its run, must exist and hold its weights file; a bad
reference raises ConfigError naming ``--from`` and the reference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mlflow import MlflowClient

from pipeline.config import ConfigError, absolute_url
from pipeline.data.storage import StorageError, url_exists
from pipeline.run.preflight import check_storage_url
from pipeline.tracking import SCRATCH, TAG_KIND, lineage_tags, list_checkpoints

WEIGHTS_FILE = "model.safetensors"  # the raw weights of a checkpoint folder (fetch_weights)
_RUN_ID = re.compile(r"^(?:runs:/)?([0-9a-f]{32})(?:@(\d+))?/?$")
_MODEL = re.compile(r"^models:/([^/]+)/(\d+)$")


@dataclass(frozen=True)
class Origin:
    """Where finetuning starts: the weights' location and their lineage."""

    weights: dict | None  # {"kind": "checkpoint"|"mlflow", "url": ...}; None for scratch
    pretrain_run_id: str | None
    pretrain_step: int | None

    @property
    def kind(self) -> str:
        """``finetune``, or ``scratch`` without weights (the MLflow kind tag)."""
        return SCRATCH if self.weights is None else "finetune"

    def tags(self, task: str) -> dict[str, str]:
        """The run's lineage tags (task, pretraining run and step); ``launch`` adds the kind."""
        tags = lineage_tags(self.kind, task, self.pretrain_run_id, self.pretrain_step)
        del tags[TAG_KIND]  # not part of the run's identity (see launch.default_run_name)
        return tags


def check_checkpoint(ref: str, url: str, storage_options: dict | None) -> None:
    """The checkpoint folder at ``url`` exists and holds its weights file."""
    check_storage_url(f"--from {ref}", url)
    weights = f"{url.rstrip('/')}/{WEIGHTS_FILE}"
    try:
        found = url_exists(weights, storage_options)
    except StorageError as exc:
        raise ConfigError(f"--from {ref}: {exc}") from None
    if not found:
        raise ConfigError(
            f"--from {ref}: {weights} does not exist; a checkpoint is a folder holding "
            f"{WEIGHTS_FILE}"
        )


def _from_run(ref: str, run_id: str, step: str | None, tracking_uri: str) -> Origin:
    try:
        checkpoints = dict(list_checkpoints(tracking_uri, run_id))
    except Exception as exc:  # MLflow raises its own RestException / MlflowException
        raise ConfigError(f"--from {ref}: no MLflow run {run_id} ({exc})") from None
    if not checkpoints:
        raise ConfigError(f"--from {ref}: MLflow run {run_id} has no checkpoints")
    chosen = int(step) if step is not None else max(checkpoints)
    if chosen not in checkpoints:
        raise ConfigError(
            f"--from {ref}: run {run_id} has no checkpoint at step {chosen}; "
            f"it has steps {sorted(checkpoints)}"
        )
    return Origin({"kind": "checkpoint", "url": checkpoints[chosen]}, run_id, chosen)


def _from_registry(ref: str, name: str, version: str, tracking_uri: str) -> Origin:
    try:
        model_version = MlflowClient(tracking_uri).get_model_version(name, version)
    except Exception as exc:  # MLflow raises its own RestException / MlflowException
        raise ConfigError(f"--from {ref}: no such registered model version ({exc})") from None
    return Origin({"kind": "mlflow", "url": model_version.source}, model_version.run_id, None)


def resolve_reference(ref: str, tracking_uri: str, storage_options: dict | None = None) -> Origin:
    """Turn ``--from REF`` into weights to load and lineage to record.

    ``storage_options`` reach the checkpoint storage (the finetune's
    ``checkpoint.storage_options``, which is what its workers read the weights with).
    """
    if ref == SCRATCH:
        return Origin(None, None, None)
    if match := _RUN_ID.match(ref):
        origin = _from_run(ref, match.group(1), match.group(2), tracking_uri)
    elif match := _MODEL.match(ref):
        return _from_registry(ref, match.group(1), match.group(2), tracking_uri)
    elif "://" in ref or ref.startswith(("/", ".")):
        origin = Origin({"kind": "checkpoint", "url": absolute_url(ref)}, None, None)
    else:
        raise ConfigError(
            f"--from {ref!r}: expected an MLflow run id (optionally @STEP), runs:/ID, "
            "models:/NAME/VERSION, a checkpoint URL, or 'scratch'"
        )
    check_checkpoint(ref, origin.weights["url"], storage_options)
    return origin
