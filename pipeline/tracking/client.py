"""The MLflow client for a tracking URI, and which of its failures are worth a retry."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.retry import call_with_backoff
from pipeline.tracking.uri import resolve_tracking_uri

T = TypeVar("T")

# MLflow error codes that a retry cannot fix: the request itself is wrong.
_PERMANENT_ERRORS = set(
    "INVALID_PARAMETER_VALUE BAD_REQUEST RESOURCE_DOES_NOT_EXIST RESOURCE_ALREADY_EXISTS "
    "INVALID_STATE PERMISSION_DENIED UNAUTHENTICATED".split()
)


def client(uri: str) -> MlflowClient:
    """An ``MlflowClient`` for ``uri`` (tracking and model registry), SQLite paths made absolute."""
    uri = resolve_tracking_uri(uri)
    if urlsplit(uri).password is not None:
        # MLflow prints each ended run's URL, password included, unless told not to.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def is_transient(exc: BaseException) -> bool:
    """Whether a failed MLflow call may succeed when repeated (anything but a refused request)."""
    return not (isinstance(exc, MlflowException) and exc.error_code in _PERMANENT_ERRORS)


def call_mlflow(fn: Callable[[], T], what: str, retries: int, backoff: float) -> T:
    """``fn()``, repeated up to ``retries`` more times while MLflow fails transiently."""
    return call_with_backoff(
        fn, is_transient=is_transient, attempts=retries + 1, backoff=backoff, what=f"MLflow {what}"
    )
