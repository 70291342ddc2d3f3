"""MLflow tracking: the run created in the driver, the rank-0 logger in the workers, lineage tags.

One training run is one MLflow run, even across Ray Train restarts. By concern:

- ``redact``: secrets never reach MLflow; MLflow's limits on keys and values.
- ``uri``: the tracking URI, checked before a run starts.
- ``client``: the MLflow client for a URI and the retry of its transient failures.
- ``runs``: experiments, creating and ending runs, what a run logged so far.
- ``logger``: ``RunLogger``, the queued rank-0 metric logger.
- ``artifacts``: weights as safetensors artifacts and the model registry.
- ``lineage``: the tags linking pretrain, finetune and scratch runs; checkpoint milestones.
"""

from pipeline.tracking.artifacts import log_safetensors_weights, register_model
from pipeline.tracking.lineage import (
    CHECKPOINT_METRIC,
    ENDED_MLFLOW,
    KINDS,
    SCRATCH,
    TAG_CHECKPOINT_PREFIX,
    TAG_EXPERIMENT_RUN,
    TAG_FIGURE,
    TAG_KIND,
    TAG_LOAD_END,
    TAG_LOAD_START,
    TAG_MODEL_PARAMS,
    TAG_PARENT,
    TAG_PRETRAIN_RUN,
    TAG_PRETRAIN_STEP,
    TAG_TASK,
    lineage_tags,
    list_checkpoints,
    log_checkpoint_event,
)
from pipeline.tracking.logger import RunLogger
from pipeline.tracking.redact import (
    MAX_KEY_CHARS,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VALUE_CHARS,
    MAX_PARAMS_PER_BATCH,
    MAX_TAG_VALUE_CHARS,
    REDACTED,
    flatten_params,
    is_secret_key,
    redact,
)
from pipeline.tracking.runs import create_run, end_run, experiment_id, last_logged_steps
from pipeline.tracking.uri import TrackingError, check_tracking_uri, resolve_tracking_uri

__all__ = [
    "CHECKPOINT_METRIC",
    "ENDED_MLFLOW",
    "KINDS",
    "MAX_KEY_CHARS",
    "MAX_METRICS_PER_BATCH",
    "MAX_PARAMS_PER_BATCH",
    "MAX_PARAM_VALUE_CHARS",
    "MAX_TAG_VALUE_CHARS",
    "REDACTED",
    "SCRATCH",
    "TAG_CHECKPOINT_PREFIX",
    "TAG_EXPERIMENT_RUN",
    "TAG_FIGURE",
    "TAG_KIND",
    "TAG_LOAD_END",
    "TAG_LOAD_START",
    "TAG_MODEL_PARAMS",
    "TAG_PARENT",
    "TAG_PRETRAIN_RUN",
    "TAG_PRETRAIN_STEP",
    "TAG_TASK",
    "RunLogger",
    "TrackingError",
    "check_tracking_uri",
    "create_run",
    "end_run",
    "experiment_id",
    "flatten_params",
    "is_secret_key",
    "last_logged_steps",
    "lineage_tags",
    "list_checkpoints",
    "log_checkpoint_event",
    "log_safetensors_weights",
    "redact",
    "register_model",
    "resolve_tracking_uri",
]
