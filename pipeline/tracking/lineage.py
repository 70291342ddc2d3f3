"""Tags that place a run in the pretrain -> finetune lineage, and its checkpoint milestones.

A scheduler learns which checkpoints a pretraining run has by reading MLflow only: each
checkpoint is a ``checkpoint_step`` metric point plus a tag holding its URL.
"""

from __future__ import annotations

import time

from mlflow.entities import Metric, RunTag

from pipeline.tracking.client import call_mlflow, client
from pipeline.tracking.redact import redact, tag_value

TAG_PARENT = "mlflow.parentRunId"  # MLflow's own tag: the UI nests the run under this parent
TAG_PRETRAIN_RUN = "pipeline.pretrain_run_id"
TAG_PRETRAIN_STEP = "pipeline.pretrain_step"
TAG_TASK = "pipeline.task"
TAG_KIND = "pipeline.kind"  # pretrain | finetune | scratch
TAG_CHECKPOINT_PREFIX = "pipeline.checkpoint."
CHECKPOINT_METRIC = "checkpoint_step"
# "--from scratch", and the kind of a task run trained from random weights (a finetune's baseline).
SCRATCH = "scratch"
KINDS = ("pretrain", "finetune", SCRATCH)
ENDED_MLFLOW = {"FINISHED", "FAILED", "KILLED"}  # MLflow run statuses after the run ended

# Tags of the runs and experiments that pipeline.experiments creates and pipeline.compare reads.
TAG_EXPERIMENT_RUN = "pipeline.experiment_run"  # the run's name in the experiment file
TAG_MODEL_PARAMS = "pipeline.model_params"  # trainable parameters of the model, exact
TAG_FIGURE = "pipeline.figure"  # experiment tag: which figure pipeline.compare draws
# The machine's 1-minute load average when the run started and ended: wall times measured on a
# shared machine mean little without it.
TAG_LOAD_START, TAG_LOAD_END = "pipeline.load_at_start", "pipeline.load_at_end"


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


def log_checkpoint_event(uri: str, run_id: str, step: int, url: str) -> None:
    """Record a checkpoint milestone on the run, so a scheduler finds it by reading MLflow only."""
    metric = Metric(CHECKPOINT_METRIC, float(step), int(time.time() * 1000), int(step))
    tag = RunTag(f"{TAG_CHECKPOINT_PREFIX}{int(step)}", tag_value(redact(url)))
    call_mlflow(
        lambda: client(uri).log_batch(run_id, metrics=[metric], tags=[tag]),
        "log_checkpoint_event",
        retries=3,
        backoff=0.5,
    )


def list_checkpoints(uri: str, run_id: str) -> list[tuple[int, str]]:
    """``[(step, url), ...]`` of the run's checkpoint milestones, by step."""
    tags = client(uri).get_run(run_id).data.tags
    found = []
    for key, value in tags.items():
        suffix = key.removeprefix(TAG_CHECKPOINT_PREFIX)
        if suffix != key and suffix.isdigit():
            found.append((int(suffix), value))
    return sorted(found)
