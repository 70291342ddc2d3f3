"""One retry loop for every remote call: storage, shard reads and the tracking server.

Each caller says which failures are passing ones (``is_transient``); everything else is raised at
once. The wait doubles from ``backoff`` after each failed attempt, up to ``max_delay``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


def call_with_backoff(
    fn: Callable[[], T],
    *,
    is_transient: Callable[[BaseException], bool],
    attempts: int = 5,
    backoff: float = 0.5,
    max_delay: float = 30.0,
    what: str = "call",
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``fn()``, called up to ``attempts`` times while it raises a transient error."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts - 1 or not is_transient(exc):
                raise
            delay = min(backoff * 2**attempt, max_delay)
            log.warning("%s failed (%s); retry %d in %.2f s", what, exc, attempt + 1, delay)
            sleep(delay)
    raise AssertionError("unreachable")
