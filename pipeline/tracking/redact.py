"""Secrets never reach MLflow: every param, tag and the config artifact go through ``redact``,
and every error message we print through ``redact_text``.

Also MLflow's own limits on keys and values, so a long value or an odd key never makes the server
refuse a whole request.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pipeline.config import flatten

REDACTED = "***"
# A key is secret when its name contains one of these words (case-insensitive). Beyond the obvious
# ones: "auth" (HTTP Authorization), "passwd", and the signature of pre-signed URLs (S3
# X-Amz-Signature, Azure SAS "sig").
_SECRET_KEY = re.compile(
    r"key|secret|token|password|passwd|credential|session|auth|signature|^sig$", re.I
)

# Environment variables whose values are credentials: MLFLOW_TRACKING_PASSWORD and _TOKEN,
# RAY_AUTH_TOKEN, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, MLFLOW_FLASK_SERVER_SECRET_KEY. Matched
# at the end of the name, so TOKENIZERS_PARALLELISM or RAY_AUTH_TOKEN_PATH are not.
_SECRET_VARIABLE = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|_KEY)$", re.I)
# Shorter values are not credentials worth the name, and replacing them would blank out words.
MIN_SECRET_CHARS = 8
_URL_IN_TEXT = re.compile(r"\b[a-z][a-z0-9+.\-]*://[^\s'\"<>]+", re.I)

# MLflow's server-side limits (mlflow/utils/validation.py in MLflow 3.x).
MAX_PARAM_VALUE_CHARS = 6000
MAX_TAG_VALUE_CHARS = 8000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_KEY_CHARS = 250
_KEY_FORBIDDEN = re.compile(r"[^\w\-. /:]")  # MLflow allows alphanumerics, _ - . space / :


def is_secret_key(name: str) -> bool:
    """Whether a config key's name says its value is a credential."""
    return bool(_SECRET_KEY.search(str(name)))


def _redact_url(text: str) -> str:
    # "s3://user:password@host/x?X-Amz-Signature=..." keeps user, host and path; loses the
    # password and every secret-named query value (pre-signed URLs carry credentials there).
    if "://" not in text or ("@" not in text and "?" not in text):
        return text
    try:
        parts = urlsplit(text)
        password = parts.password
    except ValueError:
        return text
    if password is not None:
        port = f":{parts.port}" if parts.port else ""
        parts = parts._replace(netloc=f"{parts.username}:{REDACTED}@{parts.hostname or ''}{port}")
    if parts.query:
        query = parse_qsl(parts.query, keep_blank_values=True)
        parts = parts._replace(
            query=urlencode([(k, REDACTED if is_secret_key(k) else v) for k, v in query], safe="*")
        )
    return urlunsplit(parts)


def redact(obj: Any) -> Any:
    """A copy of ``obj`` with every secret-named key's value (and URL passwords) set to ``***``."""
    if isinstance(obj, Mapping):
        return {
            key: (REDACTED if value is not None else None) if is_secret_key(key) else redact(value)
            for key, value in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [redact(item) for item in obj]
    if isinstance(obj, str):
        return _redact_url(obj)
    return obj


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """The values of the credential variables in ``env`` (this process's environment), longest
    first so that a value containing another is replaced whole."""
    env = os.environ if env is None else env
    found = {
        value
        for name, value in env.items()
        if _SECRET_VARIABLE.search(name) and len(value) >= MIN_SECRET_CHARS
    }
    return sorted(found, key=len, reverse=True)


def redact_text(text: str, env: Mapping[str, str] | None = None) -> str:
    """Free text (an error message, a log line) with the password of every URL in it and the
    value of every credential variable of ``env`` replaced by ``***``."""
    text = _URL_IN_TEXT.sub(lambda match: _redact_url(match.group(0)), text)
    for value in secret_values(env):
        text = text.replace(value, REDACTED)
    return text


def safe_key(key: str) -> str:
    """``key`` with the characters MLflow rejects replaced by ``_``, cut to MLflow's length."""
    return _KEY_FORBIDDEN.sub("_", key)[:MAX_KEY_CHARS]


def tag_value(value: Any) -> str:
    """``value`` as a tag value MLflow accepts (cut to its length limit)."""
    return str(value)[:MAX_TAG_VALUE_CHARS]


def _param_value(value: Any) -> str:
    text = str(value)
    if len(text) > MAX_PARAM_VALUE_CHARS:
        text = text[: MAX_PARAM_VALUE_CHARS - 3] + "..."
    return text


def flatten_params(config_dict: Mapping[str, Any]) -> dict[str, str]:
    """``{"data": {"storage_options": {"key": k}}}`` -> ``{"data.storage_options.key": "***"}``."""
    flat = flatten(redact(config_dict))
    return {safe_key(name): _param_value(value) for name, value in flat.items()}
