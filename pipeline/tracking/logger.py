"""The rank-0 metric logger of a training run: queued in memory, sent by a background thread.

A synchronous call to a tracking server takes ~0.1 s, so ``RunLogger.log_metrics`` only queues and
a background thread sends the queue with ``log_batch``; training never waits on the network, and a
tracking outage costs metrics, never the run.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Mapping

from mlflow.entities import Metric

from pipeline.tracking.client import call_mlflow, client
from pipeline.tracking.redact import MAX_METRICS_PER_BATCH, safe_key
from pipeline.tracking.uri import resolve_tracking_uri

log = logging.getLogger(__name__)


class RunLogger:
    """Rank-0 metric logger: ``log_metrics`` only queues, a background thread sends batches."""

    def __init__(
        self,
        uri: str,
        run_id: str,
        *,
        flush_interval: float = 5.0,
        max_batch: int = MAX_METRICS_PER_BATCH,
        retries: int = 5,
        backoff: float = 0.5,
        resume_from_step: int | Mapping[str, int] | None = None,
    ) -> None:
        if not 0 < max_batch <= MAX_METRICS_PER_BATCH:
            raise ValueError(f"max_batch must be in 1..{MAX_METRICS_PER_BATCH}, got {max_batch}")
        self.uri, self.run_id = resolve_tracking_uri(uri), run_id
        self._client = client(uri)
        self._flush_interval, self._max_batch = flush_interval, max_batch
        self._retries, self._backoff = retries, backoff
        self._resume_from = resume_from_step
        self._pending: list[Metric] = []
        self._in_flight = 0
        self._closed = False
        self._flush_requested = False
        self._wake = threading.Condition()
        self.sent_metrics = 0
        self.failed_metrics = 0
        self.dropped_resumed = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="mlflow-run-logger", daemon=True)
        self._thread.start()
        _open_loggers.add(self)

    def _already_logged(self, key: str, step: int) -> bool:
        limit = self._resume_from
        if isinstance(limit, Mapping):
            limit = limit.get(key)
        return limit is not None and step <= limit

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue ``metrics`` at ``step``; never blocks on the network, never raises."""
        timestamp = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            if self._already_logged(key, step):
                self.dropped_resumed += 1
                continue
            try:
                # A key MLflow rejects would make the server refuse the whole batch.
                batch.append(Metric(safe_key(key), float(value), timestamp, int(step)))
            except (TypeError, ValueError) as exc:
                log.warning("metric %r at step %s is not a number (%s); not logged", key, step, exc)
        with self._wake:
            if self._closed:
                log.warning(
                    "RunLogger for run %s is closed; %d metrics dropped", self.run_id, len(batch)
                )
                return
            self._pending.extend(batch)
            if len(self._pending) >= self._max_batch:
                self._wake.notify_all()

    def _take(self) -> list[Metric] | None:
        with self._wake:
            while not self._pending and not self._closed:
                # A bounded wait: a notification missed for any reason costs one interval, never
                # a flush that waits forever (seen: a checkpoint upload stuck in flush()).
                self._wake.wait(self._flush_interval)
            deadline = time.monotonic() + self._flush_interval
            # Wait for a full batch or the interval: fewer, larger requests to the server.
            while len(self._pending) < self._max_batch and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._flush_requested:
                    break
                self._wake.wait(remaining)
            if not self._pending:
                return None
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            self._in_flight = len(batch)
            return batch

    def _send(self, batch: list[Metric]) -> None:
        call_mlflow(
            lambda: self._client.log_batch(self.run_id, metrics=batch),
            "log_batch",
            self._retries,
            self._backoff,
        )

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                if self._closed:
                    return
                continue
            try:
                self._send(batch)
                sent, failed = len(batch), 0
            except Exception as exc:  # a tracking outage must not kill training
                sent, failed = 0, len(batch)
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "MLflow log_batch to %s failed; %d metrics of run %s lost: %s",
                    self.uri,
                    failed,
                    self.run_id,
                    self.last_error,
                )
            with self._wake:
                self.sent_metrics += sent
                self.failed_metrics += failed
                self._in_flight = 0
                self._wake.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Send everything queued; True when the queue drained within ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._wake:
            try:
                while (self._pending or self._in_flight) and self._thread.is_alive():
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    # Asked again at every wake: another thread's flush may have ended and
                    # cleared the request while this one still waits.
                    self._flush_requested = True
                    self._wake.notify_all()
                    self._wake.wait(1.0 if remaining is None else min(remaining, 1.0))
            finally:
                self._flush_requested = False
            return not self._pending and not self._in_flight

    def close(self, timeout: float | None = 60.0) -> bool:
        """Flush and stop the background thread; True when every queued metric was handled."""
        drained = self.flush(timeout)
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        _open_loggers.discard(self)
        self._thread.join(timeout=1.0 if drained else 0.0)
        if not drained:
            log.warning("RunLogger for run %s closed with metrics still unsent", self.run_id)
        return drained

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# Loggers not closed by their owner still send what they queued when the process exits normally.
_open_loggers: weakref.WeakSet[RunLogger] = weakref.WeakSet()


@atexit.register
def _close_open_loggers() -> None:
    for logger in list(_open_loggers):
        logger.close(timeout=10.0)
