"""The shard reader's tar parsing against tar files written by Python's tarfile in every format;
retries mid-shard; shards prefetched whole, within their bounds."""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from pipeline.data import storage
from pipeline.data.shardio import SkipCounter, iter_shard, iter_shards, register_fsspec_opener
from pipeline.data.storage import StorageError

LONG = "d" * 120 + "/sample.with.dots"


def _tar(tmp_path, tar_format: int) -> str:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as tar:
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in (
            ("k1.jpg", b"J" * 700),
            ("k1.cls", b"3"),
            (f"{LONG}.cls", b"12"),
            ("x/k2.cls", b"5"),
            ("x/k2.png", b"P" * 513),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / f"shard-{tar_format}.tar"
    path.write_bytes(buffer.getvalue())
    return str(path)


@pytest.mark.parametrize(
    "tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]
)
def test_samples_group_members_by_key_in_every_tar_format(tmp_path, tar_format):
    counter = SkipCounter()
    samples = list(iter_shard(_tar(tmp_path, tar_format), counter))
    assert [s["__key__"] for s in samples] == ["k1", "d" * 120 + "/sample", "x/k2"]
    assert samples[0] == {"__key__": "k1", "jpg": b"J" * 700, "cls": b"3"}
    assert samples[1]["with.dots.cls"] == b"12"
    assert samples[2] == {"__key__": "x/k2", "cls": b"5", "png": b"P" * 513}
    assert counter.by_reason()["truncated_shard"] == 0


def _cut(path: str, size: int) -> None:
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[:size])


@pytest.mark.parametrize("cut", [0, 100, 512 + 300, 2048 + 512 + 1, 3072])
def test_a_tar_cut_in_its_first_sample_yields_nothing_and_counts_one(tmp_path, cut):
    path = _tar(tmp_path, tarfile.GNU_FORMAT)
    _cut(path, cut)  # 3072: right after k1.cls, but no end-of-archive marker
    counter = SkipCounter()
    assert list(iter_shard(path, counter)) == []
    assert counter.by_reason()["truncated_shard"] == 1


def test_a_cut_tar_keeps_the_samples_completed_before_the_cut(tmp_path):
    path = _tar(tmp_path, tarfile.PAX_FORMAT)
    with tarfile.open(path) as tar:
        cut = tar.getmember("x/k2.png").offset_data + 100  # x/k2 is cut: dropped
    _cut(path, cut)
    counter = SkipCounter()
    keys = [sample["__key__"] for sample in iter_shard(path, counter)]
    assert keys == ["k1", "d" * 120 + "/sample"]
    assert counter.by_reason()["truncated_shard"] == 1


def test_a_damaged_header_counts_as_truncation(tmp_path):
    path = _tar(tmp_path, tarfile.GNU_FORMAT)
    data = bytearray(open(path, "rb").read())
    data[512 + 10] ^= 0xFF  # the name of the first file: checksum no longer matches
    with open(path, "wb") as handle:
        handle.write(bytes(data))
    counter = SkipCounter()
    assert list(iter_shard(path, counter)) == []
    assert counter.skipped_samples() == 1


class _FlakyMemoryFS(MemoryFileSystem):
    """memory:// whose first ``breaks`` opens break the connection after 4700 bytes."""

    protocol = ("flakymem",)
    opened = 0
    breaks = 1

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("flakymem://"))

    def _open(self, path, mode="rb", **kwargs):
        data = super()._open(path, mode, **kwargs).getvalue()
        type(self).opened += 1
        return _BreakingReader(data) if type(self).opened <= type(self).breaks else io.BytesIO(data)


class _BreakingReader(io.BytesIO):
    def read(self, size=-1):
        if self.tell() >= 4700:  # inside x/k2.cls: k1 was yielded, a resume skips 3 members
            raise ConnectionResetError("connection reset by peer")
        return super().read(size)


def _flaky_shard(tmp_path, monkeypatch, breaks: int) -> str:
    """The test tar at flakymem://, breaking on its first ``breaks`` opens; no retry wait."""
    monkeypatch.setattr(storage, "RETRY_BACKOFF", 0.0)
    fsspec.register_implementation("flakymem", _FlakyMemoryFS, clobber=True)
    register_fsspec_opener()
    path = _tar(tmp_path, tarfile.GNU_FORMAT)
    with open(path, "rb") as handle:
        _FlakyMemoryFS().pipe_file("/flaky/shard.tar", handle.read())
    monkeypatch.setattr(_FlakyMemoryFS, "opened", 0)  # count the reads only, not the write
    monkeypatch.setattr(_FlakyMemoryFS, "breaks", breaks)
    return path


def test_a_connection_reset_mid_shard_reopens_and_resumes(tmp_path, monkeypatch):
    path = _flaky_shard(tmp_path, monkeypatch, breaks=1)
    counter = SkipCounter()
    flaky = list(iter_shard("flakymem://flaky/shard.tar", counter))
    assert _FlakyMemoryFS.opened == 2  # broken once, reopened once
    assert flaky == list(iter_shard(path, SkipCounter()))
    assert [s["__key__"] for s in flaky] == ["k1", "d" * 120 + "/sample", "x/k2"]
    assert counter.skipped_samples() == 0


def test_a_shard_that_keeps_breaking_fails_naming_its_url(tmp_path, monkeypatch):
    _flaky_shard(tmp_path, monkeypatch, breaks=100)
    with pytest.raises(StorageError) as caught:
        list(iter_shard("flakymem://flaky/shard.tar", SkipCounter()))
    assert caught.value.url == "flakymem://flaky/shard.tar"
    assert caught.value.reason.startswith("reading failed after 5 attempt(s)")
    assert _FlakyMemoryFS.opened == storage.RETRY_ATTEMPTS == 5


def _shards(tmp_path, count: int) -> list[str]:
    paths = []
    for n in range(count):
        renamed = tmp_path / f"s{n}.tar"
        Path(_tar(tmp_path, tarfile.GNU_FORMAT)).rename(renamed)
        paths.append(str(renamed))
    return paths


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_prefetched_shards_give_the_samples_of_streamed_ones(tmp_path, prefetch):
    urls = _shards(tmp_path, 4)
    streamed = [list(iter_shard(url, SkipCounter())) for url in urls]
    read = [
        (url, list(samples))
        for url, samples in iter_shards(urls, SkipCounter(), None, False, prefetch)
    ]
    assert read == list(zip(urls, streamed, strict=True))


def test_prefetch_stays_within_its_shards(tmp_path):
    urls = _shards(tmp_path, 6)
    pulled = []

    def endless():  # a training stream's shard order never ends
        while True:
            for url in urls:
                pulled.append(url)
                yield url

    for depth in (1, 3):
        pulled.clear()
        shards_read = 0
        for _, samples in iter_shards(endless(), SkipCounter(), None, False, depth):
            list(samples)
            shards_read += 1
            time.sleep(0.05)  # the fetchers catch up, as far as they may
            assert len(pulled) - shards_read <= depth
            if shards_read == 8:
                break
        assert len(pulled) - shards_read == depth
    pulled.clear()
    reader = iter_shards(endless(), SkipCounter(), None, False, 3, max_bytes=1)
    for shards_read in range(1, 9):
        _, samples = next(reader)
        assert len(list(samples)) == 3
        time.sleep(0.02)
        # Shards already fetched hold more than max_bytes: only fetches under way can be ahead.
        assert len(pulled) - shards_read <= 3
    reader.close()


def test_a_missing_shard_fails_at_its_turn_naming_its_url(tmp_path):
    urls = _shards(tmp_path, 2)
    urls.insert(1, str(tmp_path / "missing.tar"))
    read = iter_shards(urls, SkipCounter(), None, False, prefetch_shards=2)
    assert next(read)[0] == urls[0]
    with pytest.raises(StorageError, match="missing.tar: does not exist"):
        next(read)
