"""Console output through ``logging``: the same lines as plain prints by default.

Commands call ``configure`` once with the verbosity their ``--quiet``/``--verbose`` flags chose;
Ray Train workers call it too, so a worker's progress lines reach the driver's console unchanged.
"""

from __future__ import annotations

import logging
import sys

QUIET, NORMAL, VERBOSE = logging.WARNING, logging.INFO, logging.DEBUG
_HANDLER_NAME = "pipeline-console"


def configure(level: int = NORMAL, *, propagate: bool = True) -> None:
    """Send the ``pipeline`` loggers' records at ``level`` and above to stdout, message only.

    ``propagate=False`` makes this the records' only handler: on a Ray Train worker the root
    logger prints every record to the console too (Ray Train's worker logging), so a record
    that also reached it would show twice on the driver.
    """
    logger = logging.getLogger("pipeline")
    logger.setLevel(level)
    logger.propagate = propagate
    if not any(handler.get_name() == _HANDLER_NAME for handler in logger.handlers):
        handler = _Stdout()
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


class _Stdout(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stdout`` is at the time (pytest swaps it)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass
