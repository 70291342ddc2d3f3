"""The project's one place for fsspec I/O: opening, listing, atomic writes and retries.

Every URL fsspec understands works (``file://``, ``s3://``, ``gs://``, ``memory://``, ...), and so
does a plain local path. Credentials and endpoints come from the standard environment
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...) or from ``storage_options``, which are passed to
the fsspec filesystem unchanged (for s3fs e.g. ``{"client_kwargs": {"endpoint_url": ...}}``).
"""

from __future__ import annotations

import collections
import errno
import os
import socket
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.retry import call_with_backoff

T = TypeVar("T")
R = TypeVar("R")

# Object stores make an object visible only when its upload completes (a single PUT, or the final
# CompleteMultipartUpload), so writing straight to the final key is already atomic there.
_ATOMIC_PUT_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory", "oss"}

# Error codes object stores answer when they are overloaded or briefly failing (S3/GCS docs).
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "RequestLimitExceeded",
}
_TRANSIENT_ERRNOS = {
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.EPIPE,
    errno.EAGAIN,
}


# Transient errors: 5 attempts, waiting 0.5, 1, 2, 4 s in between (on top of the storage
# client's own retries, e.g. botocore's). Read at each call, so tests can shorten the wait.
RETRY_ATTEMPTS = 5
RETRY_BACKOFF = 0.5


class StorageError(Exception):
    """A storage operation failed; the message names the URL."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason

    def __reduce__(self):
        # Ray pickles a worker's exception for the driver: rebuild it from both arguments.
        return type(self), (self.url, self.reason)


def filesystem(
    url: str, storage_options: dict | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem serving ``url`` and the path inside it."""
    if url.startswith("pipe:"):
        raise StorageError(url, "pipe: URLs are not storage URLs (see allow_pipe in the reader)")
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise StorageError(url, f"no filesystem for this URL ({exc})") from exc


def is_local(url: str) -> bool:
    """Whether ``url`` is a plain path or a ``file://`` URL."""
    return "://" not in url or url.startswith("file://")


def join_url(base: str, name: str) -> str:
    """``base`` + ``/`` + ``name`` for URLs and plain paths alike."""
    return base.rstrip("/") + "/" + name.lstrip("/")


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) looks like a passing storage failure."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
            return False
        if isinstance(exc, ConnectionError | TimeoutError | socket.timeout):
            return True
        if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
            return True
        name = type(exc).__name__
        if name in {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"}:
            return True
        if name in {"ServerDisconnectedError", "ClientConnectionError", "ClientPayloadError"}:
            return True
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0
            if code in _TRANSIENT_CODES or int(status) >= 500 or code.startswith("5"):
                return True
        exc = exc.__cause__ or exc.__context__
    return False


def _describe(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "does not exist"
    if isinstance(exc, PermissionError):
        return f"access refused ({exc})"
    return f"{type(exc).__name__}: {exc}"


def call_with_retries(url: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` with retries; turn whatever still fails into a StorageError naming ``url``."""
    try:
        return call_with_backoff(
            fn, is_transient=is_transient, attempts=RETRY_ATTEMPTS, backoff=RETRY_BACKOFF, what=url
        )
    except StorageError:
        raise
    except Exception as exc:
        raise StorageError(url, _describe(exc)) from exc


def open_url(
    url: str, mode: str = "rb", storage_options: dict | None = None, **open_options: Any
) -> IO[Any]:
    """Open ``url`` as a file object (prefer ``atomic_write_bytes`` for writing);
    ``open_options`` go to the filesystem's ``open`` (e.g. ``block_size``)."""
    fs, path = filesystem(url, storage_options)
    if "r" in mode:
        # A missing object should fail here, not on the first read deep inside a consumer.
        return call_with_retries(url, lambda: fs.open(path, mode, **open_options))
    if "w" in mode and isinstance(fs, LocalFileSystem):
        parent = os.path.dirname(path)
        call_with_retries(url, lambda: os.makedirs(parent, exist_ok=True))
    return call_with_retries(url, lambda: fs.open(path, mode, **open_options))


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    """The whole content of ``url``."""
    fs, path = filesystem(url, storage_options)
    return call_with_retries(url, lambda: fs.cat_file(path))


def url_exists(url: str, storage_options: dict | None = None) -> bool:
    """Whether an object or directory exists at ``url``."""
    fs, path = filesystem(url, storage_options)
    return call_with_retries(url, lambda: fs.exists(path))


def url_size(url: str, storage_options: dict | None = None) -> int:
    """Size of the object at ``url`` in bytes."""
    fs, path = filesystem(url, storage_options)
    return int(call_with_retries(url, lambda: fs.size(path)))


def _listing(prefix: str, list_fn: Callable[[], list]) -> list:
    """``list_fn()`` with retries; [] when the folder ``prefix`` does not exist."""

    def listing() -> list:
        try:
            return list_fn()
        except FileNotFoundError:
            return []

    return call_with_retries(prefix, listing)


def find_files(prefix: str, storage_options: dict | None = None) -> list[str]:
    """Sorted paths, relative to the folder ``prefix``, of every file below it, hidden ones
    (a path part starting with ``.``) left out; [] when it is absent."""
    fs, path = filesystem(prefix, storage_options)
    root = path.rstrip("/")
    found = (
        p[len(root) + 1 :]
        for p in _listing(prefix, lambda: fs.find(root))
        if p.startswith(root + "/")
    )
    return sorted(p for p in found if not any(part.startswith(".") for part in p.split("/")))


def remove_url(url: str, storage_options: dict | None = None) -> None:
    """Delete the object at ``url`` (no error when it is already gone)."""
    fs, path = filesystem(url, storage_options)

    def remove() -> None:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass

    call_with_retries(url, remove)


def _atomic_put(url: str, storage_options: dict | None, put: Callable[[Any, str], None]) -> None:
    """Run ``put(fs, path)`` so that readers of ``url`` see the old state or all of it."""
    fs, path = filesystem(url, storage_options)
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & _ATOMIC_PUT_PROTOCOLS:
        call_with_retries(url, lambda: put(fs, path))
        return
    parent, name = os.path.split(path.rstrip("/"))
    # A hidden temporary name in the same directory: the rename is atomic on POSIX, and a killed
    # write leaves only a dot-file that no reader lists as a shard.
    temporary = f"{parent}/.{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if isinstance(fs, LocalFileSystem):
        call_with_retries(url, lambda: os.makedirs(parent, exist_ok=True))
    try:
        call_with_retries(url, lambda: put(fs, temporary))
        if isinstance(fs, LocalFileSystem):
            # os.replace, not fs.mv: shutil.move would put the file inside a directory that
            # occupies the final name instead of failing.
            call_with_retries(url, lambda: os.replace(temporary, path))
        else:
            call_with_retries(url, lambda: fs.mv(temporary, path))
    except BaseException:
        try:
            fs.rm_file(temporary)
        except Exception:  # noqa: BLE001 - best-effort cleanup after the real error
            pass
        raise


def atomic_write_bytes(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write ``data`` to ``url`` so that readers see the old state or all of it, never a part."""
    _atomic_put(url, storage_options, lambda fs, path: fs.pipe_file(path, data))


def upload_file(local_path: str, url: str, storage_options: dict | None = None) -> None:
    """Copy the local file ``local_path`` to ``url`` whole, atomically as ``atomic_write_bytes``."""
    _atomic_put(url, storage_options, lambda fs, path: fs.put_file(local_path, path))


def is_temporary_name(name: str) -> bool:
    """Whether ``name`` is a leftover temporary file of ``atomic_write_bytes``."""
    return name.startswith(".") and ".tmp-" in name


def url_sizes(prefix: str, storage_options: dict | None = None) -> dict[str, int]:
    """``{name: bytes}`` of the files directly under the directory ``prefix`` (one listing)."""
    fs, path = filesystem(prefix, storage_options)
    return {
        os.path.basename(entry["name"].rstrip("/")): int(entry.get("size") or 0)
        for entry in _listing(prefix, lambda: fs.ls(path, detail=True))
        if entry.get("type") != "directory"
    }


def read_existing(urls: list[str], storage_options: dict | None = None) -> dict[str, bytes]:
    """The content of each of ``urls`` that exists (fetched concurrently where the store can)."""
    if not urls:
        return {}
    fs, _ = filesystem(urls[0], storage_options)
    paths = {filesystem(url, storage_options)[1]: url for url in urls}
    found = call_with_retries(urls[0], lambda: fs.cat(list(paths), on_error="omit"))
    return {paths[path]: data for path, data in found.items() if path in paths}


def read_ahead(fn: Callable[[T], R], items: Iterable[T], window: int) -> Iterator[R]:
    """``fn(item)`` for each of ``items``, in order, with up to ``window`` calls running ahead
    in threads (I/O overlaps the consumer's work; at most ``window`` results wait in memory)."""
    if window < 1:
        yield from map(fn, items)
        return
    pending: collections.deque[Future] = collections.deque()
    with ThreadPoolExecutor(max_workers=window, thread_name_prefix="read-ahead") as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
