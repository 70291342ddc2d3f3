"""pipeline.data.storage: atomic writes, listing, clear errors naming the URL, retries."""

from __future__ import annotations

import errno
import time

import pytest

from pipeline.data import storage
from pipeline.data.storage import StorageError
from pipeline.retry import call_with_backoff
from tests.helpers.flaky import Flaky


def test_atomic_write_leaves_only_the_final_file(tmp_path):
    url = f"file://{tmp_path}/deep/dir/blob.bin"
    storage.atomic_write_bytes(url, b"x" * 1000)
    storage.atomic_write_bytes(url, b"y" * 10)  # overwrite in place
    assert (tmp_path / "deep/dir/blob.bin").read_bytes() == b"y" * 10
    assert sorted(p.name for p in (tmp_path / "deep/dir").iterdir()) == ["blob.bin"]


def test_failed_atomic_write_keeps_old_content_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "occupied"
    target.mkdir()  # a directory under the final name: the rename must fail
    (target / "keep").write_bytes(b"old")
    with pytest.raises(StorageError, match="occupied"):
        storage.atomic_write_bytes(str(target), b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]
    assert (target / "keep").read_bytes() == b"old"


def test_plain_paths_and_file_urls_are_the_same_place(tmp_path):
    storage.atomic_write_bytes(str(tmp_path / "a.txt"), b"abc")
    assert storage.read_bytes(f"file://{tmp_path}/a.txt") == b"abc"
    assert storage.url_exists(f"file://{tmp_path}/a.txt")
    assert not storage.url_exists(str(tmp_path / "b.txt"))
    assert storage.url_size(str(tmp_path / "a.txt")) == 3
    with storage.open_url(str(tmp_path / "a.txt")) as handle:
        assert handle.read() == b"abc"


def test_memory_urls_round_trip():
    storage.atomic_write_bytes("memory://storage-test/x/y.bin", b"12345")
    assert storage.read_bytes("memory://storage-test/x/y.bin") == b"12345"
    assert storage.url_size("memory://storage-test/x/y.bin") == 5
    storage.remove_url("memory://storage-test/x/y.bin")
    assert not storage.url_exists("memory://storage-test/x/y.bin")


def test_missing_url_error_names_the_url(tmp_path):
    url = f"file://{tmp_path}/absent.bin"
    with pytest.raises(StorageError) as caught:
        storage.read_bytes(url)
    assert caught.value.url == url
    assert str(caught.value) == f"{url}: does not exist"
    with pytest.raises(StorageError, match="absent.bin: does not exist"):
        storage.open_url(url)


def test_pipe_urls_are_not_storage():
    with pytest.raises(StorageError, match="pipe:"):
        storage.read_bytes("pipe:cat /etc/hostname")


class _ClientError(Exception):
    """Shaped like botocore's ClientError: the classification reads ``response``."""

    def __init__(self, code: str, status: int) -> None:
        super().__init__(code)
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


def _retry(fn, attempts: int, backoff: float, sleep) -> str:
    return call_with_backoff(
        fn, is_transient=storage.is_transient, attempts=attempts, backoff=backoff, sleep=sleep
    )


def test_retry_backs_off_exponentially_on_transient_errors():
    sleeps: list[float] = []
    flaky = Flaky(ConnectionError("reset"), TimeoutError(), _ClientError("SlowDown", 503))
    assert _retry(flaky, attempts=5, backoff=0.25, sleep=sleeps.append) == "done"
    assert flaky.calls == 4
    assert sleeps == [0.25, 0.5, 1.0]


def test_retry_gives_up_after_the_last_attempt():
    sleeps: list[float] = []
    flaky = Flaky(*[OSError(errno.ECONNRESET, "reset")] * 3)
    with pytest.raises(OSError):
        _retry(flaky, attempts=3, backoff=1.0, sleep=sleeps.append)
    assert flaky.calls == 3
    assert sleeps == [1.0, 2.0]


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError("x"),
        PermissionError("x"),
        ValueError("x"),
        _ClientError("AccessDenied", 403),
    ],
)
def test_retry_does_not_repeat_permanent_errors(error):
    sleeps: list[float] = []
    flaky = Flaky(error)
    with pytest.raises(type(error)):
        _retry(flaky, attempts=5, backoff=1.0, sleep=sleeps.append)
    assert (flaky.calls, sleeps) == (1, [])


def test_storage_calls_try_five_times_then_name_the_url(monkeypatch):
    monkeypatch.setattr(storage, "RETRY_BACKOFF", 0.0)
    flaky = Flaky(*[ConnectionResetError("reset")] * 5)
    with pytest.raises(StorageError) as caught:
        storage.call_with_retries("s3://bucket/x", flaky)
    assert flaky.calls == storage.RETRY_ATTEMPTS == 5
    assert caught.value.url == "s3://bucket/x"
    assert caught.value.reason == "ConnectionResetError: reset"
    assert storage.call_with_retries("s3://bucket/x", Flaky(*[TimeoutError()] * 4)) == "done"


def test_transient_cause_is_found_through_the_exception_chain():
    try:
        try:
            raise ConnectionResetError("peer reset")
        except ConnectionResetError as inner:
            raise OSError("read failed") from inner
    except OSError as outer:
        assert storage.is_transient(outer)


def test_storage_error_survives_pickling_as_ray_sends_it_from_a_worker():
    import pickle

    error = pickle.loads(pickle.dumps(StorageError("s3://bucket/x", "access refused")))
    assert (type(error), str(error)) == (StorageError, "s3://bucket/x: access refused")
    assert (error.url, error.reason) == ("s3://bucket/x", "access refused")


def test_upload_file_is_atomic_and_sizes_list_the_files(tmp_path):
    local = tmp_path / "local.tar"
    local.write_bytes(b"z" * 700)
    for url in (f"file://{tmp_path}/dest/a.tar", "memory://upload-test/dest/a.tar"):
        storage.upload_file(str(local), url)
        assert storage.read_bytes(url) == b"z" * 700
        storage.atomic_write_bytes(url.replace("a.tar", "sub/b.json"), b"{}")
        assert storage.url_sizes(url.rsplit("/", 1)[0]) == {"a.tar": 700}  # files only
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["a.tar", "sub"]
    assert storage.url_sizes(str(tmp_path / "absent")) == {}


def test_find_files_is_recursive_relative_and_leaves_hidden_files_out(tmp_path):
    for name in ("b/2.jpg", "a/x/1.jpg", "a/.hidden.jpg", ".cache/3.jpg", "top.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert storage.find_files(f"file://{tmp_path}/") == ["a/x/1.jpg", "b/2.jpg", "top.txt"]
    assert storage.find_files(str(tmp_path / "absent")) == []


def test_read_existing_leaves_out_what_is_absent(tmp_path):
    storage.atomic_write_bytes(str(tmp_path / "a"), b"1")
    urls = [str(tmp_path / "a"), str(tmp_path / "missing")]
    assert storage.read_existing(urls) == {str(tmp_path / "a"): b"1"}
    assert storage.read_existing([]) == {}


def test_read_ahead_keeps_the_order_and_at_most_its_window_running_ahead():
    started, consumed = [], 0

    def slow(item: int) -> int:
        started.append(item)
        time.sleep(0.01 * (item % 3))
        return item * 2

    for result in storage.read_ahead(slow, range(10), window=3):
        assert result == 2 * consumed
        consumed += 1
        assert len(started) <= consumed + 3
    assert list(storage.read_ahead(slow, [1, 2], window=0)) == [2, 4]
