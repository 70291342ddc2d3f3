"""Reading webdataset tar shards from any fsspec URL; skip counters shared by loader workers."""

from __future__ import annotations

import multiprocessing
import tarfile
from collections.abc import Iterator

import fsspec
from webdataset.gopen import gopen as wds_open
from webdataset.gopen import gopen_schemes
from webdataset.tariterators import base_plus_ext

from pipeline.data import storage
from pipeline.data.storage import StorageError, is_local, is_transient, open_url
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


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw) -> object:
    """webdataset opener backed by fsspec (webdataset itself has no s3:// or memory:// handler)."""
    return open_url(url, mode, kw.get("storage_options"))


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
    shard = _ReopeningShard(url, storage_options, allow_pipe)
    current: dict | None = None
    try:
        while (member := shard.next_member()) is not None:
            key, ext = base_plus_ext(member[0])
            if key is None:
                continue
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext.lower()] = member[1]
    except tarfile.ReadError:
        counter.add("truncated_shard")
        return
    finally:
        shard.close()
    if current is not None:
        yield current
