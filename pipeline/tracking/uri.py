"""Which tracking URI a run uses, and whether it can be used before the run starts.

A tracking server may authenticate (``mlflow server --app-name basic-auth``, as in
``infra/mlflow/``). MLflow's client then sends the credentials it finds itself: the variables of
``CREDENTIAL_VARIABLES``, ``~/.mlflow/credentials``, or a ``user:password@`` in the URI. The check
below asks the server's API with exactly those, so wrong credentials stop a run before it starts.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.config import absolute_sqlite_uri
from pipeline.tracking.redact import redact, redact_text

# The variables MLflow's client reads its credentials from (mlflow.environment_variables).
CREDENTIAL_VARIABLES = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
CREDENTIALS_HINT = (
    "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user of that server "
    "(or put them in ~/.mlflow/credentials)"
)
_API_PROBE = "/api/2.0/mlflow/experiments/search"  # any authenticated user may read it


class TrackingError(RuntimeError):
    """The tracking URI or a run cannot be used; the message names the URI or run."""


# The tracking module's name for the project's one SQLite-URI resolver.
resolve_tracking_uri = absolute_sqlite_uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for other schemes and in-memory stores."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def check_credentials(uri: str, timeout: float = 5.0) -> None:
    """Raise ``TrackingError`` if the server at ``uri`` refuses the credentials MLflow's client
    would send (none, or wrong ones, to an authenticating server)."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(uri)
    try:
        # No retries: the server answered /health a moment ago, and a refusal is final.
        response = http_request(
            creds, _API_PROBE, "GET", max_retries=0, timeout=timeout, params={"max_results": 1}
        )
    except Exception as exc:  # requests' and urllib3's errors; MLflow wraps some in its own
        raise TrackingError(
            f"MLflow tracking server {redact(uri)} answers /health but not its API "
            f"({redact_text(str(exc))})"
        ) from None
    user = creds.username or urlsplit(uri).username
    if response.status_code == 401:
        given = f"refused the credentials of user {user!r}" if user else "asks for credentials"
        raise TrackingError(
            f"MLflow tracking server {redact(uri)} {given} (HTTP 401): {CREDENTIALS_HINT}"
        )
    if response.status_code == 403:
        raise TrackingError(
            f"MLflow tracking server {redact(uri)}: user {user!r} may not read experiments "
            "(HTTP 403); ask the server's admin for a permission or use another user"
        )


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Raise ``TrackingError`` if an HTTP server does not answer or refuses our credentials, or a
    SQLite file is unwritable."""
    scheme = urlsplit(uri).scheme
    if scheme in ("http", "https"):
        health = uri.rstrip("/") + "/health"
        try:
            # urlopen raises HTTPError (a URLError) on any non-2xx answer. /health asks for no
            # credentials: a user:password@ in the URI is dropped here, not sent.
            urllib.request.urlopen(_without_userinfo(health), timeout=timeout).close()
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingError(
                f"MLflow tracking server {redact(uri)} does not answer "
                f"({redact_text(str(exc))}); start it, or use a reachable server or a local file "
                "(sqlite:///mlflow.db) as the tracking URI"
            ) from None
        check_credentials(uri, timeout)
        return
    path = sqlite_path(uri)
    if path is None:
        return
    directory = path.resolve().parent
    if not directory.is_dir():
        raise TrackingError(f"tracking URI {uri}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise TrackingError(f"tracking URI {uri}: {path.resolve()} is not writable")


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
