"""``--from REF``: where a finetune starts, proved to exist before anything is started.

REF names the starting weights:
  - an MLflow run id (its latest checkpoint) or ``RUN_ID@STEP`` (the checkpoint of that step),
    also written ``runs:/RUN_ID``;
  - ``models:/NAME/VERSION``, a registered model version;
  - a checkpoint URL or path: a folder holding ``ema.safetensors`` and ``model.safetensors``
    (file://, s3://, a path);
  - ``scratch``: random initialisation, the baseline.
``weights`` (``--weights``) chooses the EMA weights (the default: the ones DM reports) or the raw
ones: a checkpoint holds both files; a run publishes both artifacts and its registered model
version holds the EMA weights (``pipeline.tracking.artifacts``). A checkpoint, named directly or
through its run, must exist and hold its raw weights file, and its EMA file for the EMA weights;
a bad reference raises ConfigError naming ``--from`` (or ``--weights``) and the reference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mlflow import MlflowClient

from pipeline.config import ConfigError, absolute_url
from pipeline.data.storage import StorageError, url_exists
from pipeline.run.preflight import check_storage_url
from pipeline.tracking import SCRATCH, TAG_KIND, lineage_tags, list_checkpoints
from pipeline.tracking.artifacts import (
    TAG_PRETRAIN_WEIGHTS,
    TAG_WEIGHTS,
    WEIGHTS,
    WEIGHTS_ARTIFACTS,
)
from pipeline.train.checkpoint import WEIGHTS_FILES

_RUN_ID = re.compile(r"^(?:runs:/)?([0-9a-f]{32})(?:@(\d+))?/?$")
_MODEL = re.compile(r"^models:/([^/]+)/(\d+)$")


@dataclass(frozen=True)
class Origin:
    """Where finetuning starts: the weights' location and their lineage."""

    # {"kind": "checkpoint"|"mlflow", "url": ..., "weights": "ema"|"raw"}; None for scratch
    weights: dict | None
    pretrain_run_id: str | None
    pretrain_step: int | None

    @property
    def kind(self) -> str:
        """``finetune``, or ``scratch`` without weights (the MLflow kind tag)."""
        return SCRATCH if self.weights is None else "finetune"

    def tags(self, task: str) -> dict[str, str]:
        """The run's lineage tags (task, pretraining run, step and weights); ``launch`` adds the
        kind."""
        tags = lineage_tags(self.kind, task, self.pretrain_run_id, self.pretrain_step)
        del tags[TAG_KIND]  # not part of the run's identity (see launch.default_run_name)
        if self.weights is not None and "weights" in self.weights:
            tags[TAG_PRETRAIN_WEIGHTS] = self.weights["weights"]
        return tags


def check_checkpoint(
    ref: str, url: str, storage_options: dict | None, weights: str = WEIGHTS[0]
) -> None:
    """The checkpoint folder at ``url`` exists and holds its raw weights file and, for the EMA
    weights, its EMA weights file."""
    check_storage_url(f"--from {ref}", url)
    raw, chosen = WEIGHTS_FILES["raw"], WEIGHTS_FILES[weights]
    for name in dict.fromkeys((raw, chosen)):
        path = f"{url.rstrip('/')}/{name}"
        try:
            found = url_exists(path, storage_options)
        except StorageError as exc:
            raise ConfigError(f"--from {ref}: {exc}") from None
        if not found and name == raw:
            raise ConfigError(
                f"--from {ref}: {path} does not exist; a checkpoint is a folder holding {raw}"
            )
        if not found:
            raise ConfigError(
                f"--from {ref}: {path} does not exist; --weights {weights} needs a checkpoint "
                f"holding {name} (--weights raw starts from {raw})"
            )


def _checkpoint_of_run(
    ref: str, run_id: str, step: str | None, tracking_uri: str
) -> tuple[str, int]:
    """(folder URL, step) of the run's checkpoint at ``step`` (its latest without one)."""
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
    return checkpoints[chosen], chosen


def _published(ref: str, run_id: str | None, weights: str, tracking_uri: str) -> str:
    """The ``runs:/`` URI of the ``weights`` artifact that run ``run_id`` published."""
    path = WEIGHTS_ARTIFACTS[weights]
    try:
        folder = path.rpartition("/")[0]
        listed = {item.path for item in MlflowClient(tracking_uri).list_artifacts(run_id, folder)}
    except Exception as exc:  # MLflow raises its own RestException / MlflowException
        raise ConfigError(
            f"--from {ref}: cannot list the artifacts of run {run_id} ({exc})"
        ) from None
    if path not in listed:
        raise ConfigError(
            f"--from {ref} --weights {weights}: run {run_id} published no {path}; its registered "
            "version holds the other weights"
        )
    return f"runs:/{run_id}/{path}"


def _from_registry(ref: str, name: str, version: str, tracking_uri: str, weights: str) -> Origin:
    try:
        model_version = MlflowClient(tracking_uri).get_model_version(name, version)
    except Exception as exc:  # MLflow raises its own RestException / MlflowException
        raise ConfigError(f"--from {ref}: no such registered model version ({exc})") from None
    # A version without the tag was registered before runs published both weights: raw ones.
    url, run_id = model_version.source, model_version.run_id
    if (model_version.tags or {}).get(TAG_WEIGHTS, "raw") != weights:
        url = _published(ref, run_id, weights, tracking_uri)
    return Origin({"kind": "mlflow", "url": url, "weights": weights}, run_id, None)


def resolve_reference(
    ref: str,
    tracking_uri: str,
    storage_options: dict | None = None,
    weights: str = WEIGHTS[0],
) -> Origin:
    """Turn ``--from REF`` into weights to load and lineage to record.

    ``storage_options`` reach the checkpoint storage (the finetune's
    ``checkpoint.storage_options``, which is what its workers read the weights with);
    ``weights`` is "ema" (the default) or "raw".
    """
    if weights not in WEIGHTS:
        raise ConfigError(f"--weights {weights!r}: choose one of {list(WEIGHTS)}")
    if ref == SCRATCH:
        return Origin(None, None, None)
    if match := _MODEL.match(ref):
        return _from_registry(ref, match.group(1), match.group(2), tracking_uri, weights)
    if match := _RUN_ID.match(ref):
        run_id = match.group(1)
        folder, step = _checkpoint_of_run(ref, run_id, match.group(2), tracking_uri)
    elif "://" in ref or ref.startswith(("/", ".")):
        folder, run_id, step = absolute_url(ref), None, None
    else:
        raise ConfigError(
            f"--from {ref!r}: expected an MLflow run id (optionally @STEP), runs:/ID, "
            "models:/NAME/VERSION, a checkpoint URL, or 'scratch'"
        )
    check_checkpoint(ref, folder, storage_options, weights)
    return Origin({"kind": "checkpoint", "url": folder, "weights": weights}, run_id, step)
