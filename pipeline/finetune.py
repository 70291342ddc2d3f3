"""``python -m pipeline.finetune --config PATH --from REF [section.key=value ...]``.

REF names the starting weights:
  - an MLflow run id (its latest checkpoint) or ``RUN_ID@STEP`` (the checkpoint of that step),
    also written ``runs:/RUN_ID``;
  - ``models:/NAME/VERSION``, a registered model version;
  - a checkpoint URL (a folder holding ``model.safetensors``: file://, s3://, a path);
  - ``scratch``: random initialisation, the baseline.
The model gets a new classifier head sized to the task's classes, then trains with the same
Ray/DeepSpeed machinery as pretraining. The MLflow run records its origin (pretraining run id
and checkpoint step) and is nested under the pretraining run.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass

from pipeline.config import EXIT_BAD_INPUT, ConfigError
from pipeline.data.storage import StorageError
from pipeline.pretrain import prepare

SCRATCH = "scratch"
_RUN_ID = re.compile(r"^(?:runs:/)?([0-9a-f]{32})(?:@(\d+))?/?$")
_MODEL = re.compile(r"^models:/([^/]+)/(\d+)$")


@dataclass(frozen=True)
class Origin:
    """Where finetuning starts: the weights' location and their lineage."""

    weights: dict | None  # {"kind": "checkpoint"|"mlflow", "url": ...}; None for scratch
    pretrain_run_id: str | None
    pretrain_step: int | None


def resolve_reference(ref: str, tracking_uri: str) -> Origin:
    """Turn ``--from REF`` into weights to load and lineage to record."""
    if ref == SCRATCH:
        return Origin(None, None, None)
    if match := _RUN_ID.match(ref):
        from pipeline.tracking import list_checkpoints

        run_id, step = match.group(1), match.group(2)
        checkpoints = dict(list_checkpoints(tracking_uri, run_id))
        if not checkpoints:
            raise ConfigError(f"--from {ref}: MLflow run {run_id} has no checkpoints")
        chosen = int(step) if step is not None else max(checkpoints)
        if chosen not in checkpoints:
            raise ConfigError(
                f"--from {ref}: run {run_id} has no checkpoint at step {chosen}; "
                f"it has steps {sorted(checkpoints)}"
            )
        return Origin({"kind": "checkpoint", "url": checkpoints[chosen]}, run_id, chosen)
    if match := _MODEL.match(ref):
        from mlflow import MlflowClient

        name, version = match.groups()
        try:
            model_version = MlflowClient(tracking_uri).get_model_version(name, version)
        except Exception as exc:  # MLflow raises its own RestException / MlflowException
            raise ConfigError(f"--from {ref}: no such registered model version ({exc})") from None
        return Origin({"kind": "mlflow", "url": model_version.source}, model_version.run_id, None)
    if "://" in ref or ref.startswith(("/", ".")):
        return Origin({"kind": "checkpoint", "url": ref}, None, None)
    raise ConfigError(
        f"--from {ref!r}: expected an MLflow run id (optionally @STEP), runs:/ID, "
        "models:/NAME/VERSION, a checkpoint URL, or 'scratch'"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipeline.finetune``."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.finetune", description=__doc__)
    parser.add_argument("--config", required=True, help="finetune recipe (configs/finetune/)")
    parser.add_argument(
        "--from", dest="ref", required=True, help="run id[@step], models:/…, URL, scratch"
    )
    parser.add_argument("--task", default=None, help="task name recorded in MLflow")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, check, exit")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.01")
    args = parser.parse_args(argv)
    config, plan = prepare(args)
    try:
        origin = resolve_reference(args.ref, config.tracking.uri)
    except (ConfigError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.dry_run:
        print(f"would finetune from {origin}")
        return 0
    from pipeline.launch import launch
    from pipeline.tracking import TAG_PARENT, TAG_PRETRAIN_RUN, TAG_PRETRAIN_STEP, TAG_TASK

    tags = {TAG_TASK: args.task or config.tracking.experiment}
    if origin.pretrain_run_id:
        tags |= {TAG_PRETRAIN_RUN: origin.pretrain_run_id, TAG_PARENT: origin.pretrain_run_id}
    if origin.pretrain_step is not None:
        tags[TAG_PRETRAIN_STEP] = str(origin.pretrain_step)
    kind = "scratch" if origin.weights is None else "finetune"
    result = launch(config, plan, kind=kind, tags=tags, init=origin.weights)
    print(f"finetuning finished: MLflow run {result.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
