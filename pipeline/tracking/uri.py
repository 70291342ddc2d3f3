"""Which tracking URI a run uses, and whether it can be used before the run starts."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.config import absolute_sqlite_uri


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


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Raise ``TrackingError`` if an HTTP server does not answer or a SQLite file is unwritable."""
    scheme = urlsplit(uri).scheme
    if scheme in ("http", "https"):
        health = uri.rstrip("/") + "/health"
        try:
            # urlopen raises HTTPError (a URLError) on any non-2xx answer.
            urllib.request.urlopen(health, timeout=timeout).close()
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingError(
                f"MLflow tracking server {uri} does not answer ({exc}); start it, or use a "
                "reachable server or a local file (sqlite:///mlflow.db) as the tracking URI"
            ) from None
        return
    path = sqlite_path(uri)
    if path is None:
        return
    directory = path.resolve().parent
    if not directory.is_dir():
        raise TrackingError(f"tracking URI {uri}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise TrackingError(f"tracking URI {uri}: {path.resolve()} is not writable")
