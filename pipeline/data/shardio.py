"""Reading webdataset tar shards from any fsspec URL; skip counters shared by loader workers.

A shard is read whole, front to back. Streamed (``iter_shard``), it is opened with a large block
size, so an object store answers a few large range requests per shard, not one per member.
Prefetched (``iter_shards`` with ``prefetch_shards``), the next shards are fetched whole by one
request each in a background thread while the current one is decoded, which hides the
store's latency per request; the bytes waiting are bounded.
"""

from __future__ import annotations

import io
import multiprocessing
import queue
import tarfile
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import fsspec
from webdataset.gopen import gopen as wds_open
from webdataset.gopen import gopen_schemes
from webdataset.tariterators import base_plus_ext

from pipeline.data import storage
from pipeline.data.storage import StorageError, is_local, is_transient, open_url, read_bytes
from pipeline.retry import call_with_backoff

SKIP_REASONS = (
    "corrupt_image",  # image bytes that do not decode (skipped sample)
    "missing_image",  # a sample without a jpg/jpeg/png/webp member (skipped sample)
    "missing_label",  # no .cls member, or not an integer in [0, num_classes) (skipped sample)
    "truncated_shard",  # a tar that ends mid-member: the sample being read is dropped
    "blank_substitute",  # passed the cheap check, failed the decode: a blank image keeps its slot
)


class SkipCounter:
    """Per-reason counts in shared memory: DataLoader workers add, the main process reads."""

    def __init__(self) -> None:
        self._counts = multiprocessing.Array("q", len(SKIP_REASONS))

    def add(self, reason: str, count: int = 1) -> None:
        """Add ``count`` to ``reason``."""
        index = SKIP_REASONS.index(reason)
        with self._counts.get_lock():
            self._counts[index] += count

    def by_reason(self) -> dict[str, int]:
        """The counts so far, per reason."""
        with self._counts.get_lock():
            return dict(zip(SKIP_REASONS, self._counts[:], strict=True))

    def skipped_samples(self) -> int:
        """Samples skipped so far (corrupt image, missing image or label, cut by truncation)."""
        counts = self.by_reason()
        return sum(counts[r] for r in SKIP_REASONS if r != "blank_substitute")


# Streaming a shard: s3fs reads ahead 50 MiB at a time by default, gcsfs and adlfs 5 MiB and
# 4 MiB; 64 MiB for every store means a ~150 MB ImageNet shard takes three range requests.
STREAM_BLOCK = 64 * 2**20
PREFETCH_BYTES = 512 * 2**20  # fetched shards waiting to be read, per stream, at most


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw) -> object:
    """webdataset opener backed by fsspec (webdataset itself has no s3:// or memory:// handler)."""
    options = {"block_size": STREAM_BLOCK, "cache_type": "readahead"} if "r" in mode else {}
    return open_url(url, mode, kw.get("storage_options"), **options)


def register_fsspec_opener() -> None:
    """Route every fsspec protocol webdataset's gopen sees through ``open_url``."""
    for protocol in [*fsspec.available_protocols(), *fsspec.registry]:
        if protocol not in ("file", "local", "pipe"):
            gopen_schemes[protocol] = _fsspec_gopen
    # Protocols registered with fsspec later on still reach it (and unknown ones get fsspec's
    # error, naming the URL) instead of webdataset's "no gopen handler".
    gopen_schemes["__default__"] = _fsspec_gopen


register_fsspec_opener()


def open_shard(url: str, storage_options: dict | None, allow_pipe: bool) -> object:
    """Open a shard through webdataset's gopen; StorageError naming the URL if it can't be."""
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise StorageError(url, "pipe: URLs run shell commands; pass allow_pipe=True to permit")
        return wds_open(url, "rb")
    if is_local(url):
        try:
            return wds_open(url, "rb")
        except OSError as exc:
            raise StorageError(
                url, "does not exist" if isinstance(exc, FileNotFoundError) else str(exc)
            ) from exc
    return wds_open(url, "rb", storage_options=storage_options)


BLOCK = 512
_END_BLOCK = bytes(BLOCK)


def _read_exact(stream, size: int) -> bytes:
    """``size`` bytes from ``stream``; ReadError (a truncated tar) if it ends before."""
    data = stream.read(size)
    while len(data) < size:
        more = stream.read(size - len(data))
        if not more:
            raise tarfile.ReadError(f"unexpected end of data ({len(data)} of {size} bytes)")
        data += more
    return data


def _header_number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _pax_path(records: bytes) -> str | None:
    for line in records.decode("utf-8", "surrogateescape").splitlines():
        _, _, record = line.partition(" ")
        key, _, value = record.partition("=")
        if key == "path":
            return value
    return None


def _members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of a tar stream, in order.

    A small reader of the ustar format (plus GNU long names and pax paths) that reads each
    member with one call: Python's tarfile in stream mode re-buffers every member in 10 KiB
    pieces and cost more than the JPEG decode per sample here.
    """
    long_name = None
    while True:
        header = _read_exact(stream, BLOCK)  # a tar without its end marker is truncated
        if header == _END_BLOCK:
            return
        stored = _header_number(header[148:156])
        if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise tarfile.ReadError("tar header checksum mismatch")
        size, kind = _header_number(header[124:136]), header[156:157]
        data = _read_exact(stream, size)
        _read_exact(stream, -size % BLOCK)
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if header[257:263] == b"ustar\0" and header[345:346] != b"\0":  # POSIX prefix field
            name = (
                header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
            )
        if kind == b"L":
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif kind == b"x":
            long_name = _pax_path(data) or long_name
        elif kind in (b"0", b"\0", b"7"):
            yield long_name or name, data
            long_name = None
        elif kind != b"g":
            long_name = None  # directories, links, devices: not samples


class _ReopeningShard:
    """The members of one shard; after a transient failure, reopened past the members read."""

    def __init__(self, url: str, storage_options: dict | None, allow_pipe: bool) -> None:
        self.url, self._storage_options, self._allow_pipe = url, storage_options, allow_pipe
        self._stream = None
        self._members: Iterator[tuple[str, bytes]] = iter(())
        self._consumed = 0
        self._failures = 0  # failed reads of the current member

    def _read(self) -> tuple[str, bytes] | None:
        try:
            if self._stream is None:
                self._stream = open_shard(self.url, self._storage_options, self._allow_pipe)
                self._members = _members(self._stream)
                for _ in zip(range(self._consumed), self._members, strict=False):
                    pass  # read again before the failure: skipped
            member = next(self._members, None)
        except BaseException:
            self._failures += 1
            self.close()  # the next attempt reopens the shard
            raise
        self._consumed += member is not None
        self._failures = 0
        return member

    def next_member(self) -> tuple[str, bytes] | None:
        """The next (name, bytes), None at the end; ``tarfile.ReadError`` for a truncated tar."""
        try:
            return call_with_backoff(
                self._read,
                is_transient=_worth_reopening,
                attempts=storage.RETRY_ATTEMPTS,
                backoff=storage.RETRY_BACKOFF,
                what=f"reading {self.url}",
            )
        except (tarfile.ReadError, StorageError):
            raise
        except Exception as exc:
            raise StorageError(
                self.url, f"reading failed after {self._failures} attempt(s): {exc}"
            ) from exc

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()


def _worth_reopening(exc: BaseException) -> bool:
    # A truncated tar stays truncated; a StorageError (opening) already went through storage's
    # own retries.
    return not isinstance(exc, tarfile.ReadError | StorageError) and is_transient(exc)


def _group(members: Iterator[tuple[str, bytes]], counter: SkipCounter) -> Iterator[dict]:
    """Members grouped by key into samples; a truncated tar drops the sample being read."""
    current: dict | None = None
    try:
        for name, data in members:
            key, ext = base_plus_ext(name)
            if key is None:
                continue
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext.lower()] = data
    except tarfile.ReadError:
        counter.add("truncated_shard")
        return
    if current is not None:
        yield current


def _reopening_members(shard: _ReopeningShard) -> Iterator[tuple[str, bytes]]:
    try:
        while (member := shard.next_member()) is not None:
            yield member
    finally:
        shard.close()


def iter_shard(
    url: str,
    counter: SkipCounter,
    storage_options: dict | None = None,
    allow_pipe: bool = False,
) -> Iterator[dict]:
    """Samples of one shard: ``{"__key__": key, ext: bytes, ...}`` grouped by key, in tar order.

    A transient storage error mid-shard reopens the shard (with backoff) and skips the members
    already read; a truncated tar ends the shard, drops the sample being read and is counted.
    """
    return _group(_reopening_members(_ReopeningShard(url, storage_options, allow_pipe)), counter)


class _Prefetcher:
    """Whole shards fetched ahead of their reader, up to ``depth`` at once: a shard counts from
    the start of its fetch until the reader takes it, and no fetch starts while ``depth`` count
    or the fetched ones waiting hold ``max_bytes`` or more. Order is kept."""

    _END = object()

    def __init__(
        self, urls: Iterable[str], storage_options: dict | None, depth: int, max_bytes: int
    ) -> None:
        self._urls, self._storage_options = iter(urls), storage_options
        self._depth, self._max_bytes = depth, max_bytes
        self._waiting = self._bytes = 0
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._room = threading.Condition()
        self._stopped = False
        self._pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="shard-fetch")
        threading.Thread(target=self._fetch_all, name="shard-prefetch", daemon=True).start()

    def _full(self) -> bool:
        over_bytes = self._waiting > 0 and self._bytes >= self._max_bytes
        return self._waiting >= self._depth or over_bytes

    def _fetch(self, url: str) -> bytes:
        data = read_bytes(url, self._storage_options)  # one GET of the whole object
        with self._room:
            self._bytes += len(data)
        return data

    def _fetch_all(self) -> None:
        while True:
            with self._room:  # room first: a URL is taken from the order only to be fetched
                while self._full() and not self._stopped:
                    self._room.wait()
                if self._stopped:
                    return
                self._waiting += 1
            try:
                url = next(self._urls, None)
            except Exception as exc:  # noqa: BLE001 - the order itself failed: raised there
                self._ready.put(("", exc))
                return
            if url is None:
                self._ready.put(self._END)
                return
            if url.startswith("pipe:"):
                self._ready.put((url, None))  # a command's output cannot be fetched ahead
            else:
                self._ready.put((url, self._pool.submit(self._fetch, url)))

    def __iter__(self) -> Iterator[tuple[str, bytes | None]]:
        while (item := self._ready.get()) is not self._END:
            url, fetched = item
            if isinstance(fetched, Exception):
                raise fetched
            data = fetched.result() if fetched is not None else None  # raises a fetch's error
            with self._room:
                self._waiting -= 1
                self._bytes -= len(data or b"")
                self._room.notify()
            yield url, data

    def close(self) -> None:
        """Stop fetching (fetches under way finish in the background and are dropped)."""
        with self._room:
            self._stopped = True
            self._room.notify()
        self._pool.shutdown(wait=False, cancel_futures=True)


def iter_shards(
    urls: Iterable[str],
    counter: SkipCounter,
    storage_options: dict | None = None,
    allow_pipe: bool = False,
    prefetch_shards: int = 0,
    max_bytes: int = PREFETCH_BYTES,
) -> Iterator[tuple[str, Iterator[dict]]]:
    """``(url, samples)`` of each shard of ``urls`` (which may be endless), in order.

    With ``prefetch_shards`` >= 1, threads fetch the next shards whole (one request each, up to
    ``prefetch_shards`` at once and ahead, ``max_bytes`` waiting) while the caller works through
    the current one; a shard's samples then come from memory. With 0, or for ``pipe:``
    URLs, each shard is streamed when its turn comes (``iter_shard``).
    """
    if prefetch_shards < 1:
        for url in urls:
            yield url, iter_shard(url, counter, storage_options, allow_pipe)
        return
    fetcher = _Prefetcher(urls, storage_options, prefetch_shards, max_bytes)
    try:
        for url, data in fetcher:
            if data is None:
                yield url, iter_shard(url, counter, storage_options, allow_pipe)
            else:
                yield url, _group(_members(io.BytesIO(data)), counter)
    finally:
        fetcher.close()
