"""Fixtures for integration tests: a real S3 endpoint (moto's server over HTTP), a cuttable
proxy in front of it, and shards on it.

``s3_endpoint`` starts ``python -m moto.server`` on 127.0.0.1 (as s3fs's own test suite does)
once per session, with dummy credentials and ``AWS_ENDPOINT_URL`` in the environment, so both
``storage_options`` and plain ``s3://`` URLs (in this process and in subprocesses) reach it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from pipeline.data.sources import shapes
from pipeline.data.writer import write_shards
from tests.fixtures.tcp_proxy import TcpProxy
from tests.helpers.cluster import free_port, wait_until

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_SESSION_TOKEN": "testing",
}


@dataclass(frozen=True)
class S3Endpoint:
    """A running S3 endpoint: its URL, a fresh bucket, and the s3fs options that reach it."""

    endpoint_url: str
    bucket: str

    @property
    def storage_options(self) -> dict:
        """fsspec/s3fs options for this endpoint (pass as ``storage_options``)."""
        return {
            "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"endpoint_url": self.endpoint_url},
        }

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point AWS clients (and subprocesses) at this endpoint."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint_url}

    def url(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>``."""
        return "/".join([f"s3://{self.bucket}", *parts])

    def make_bucket(self, name: str) -> str:
        """Create another bucket on the endpoint; returns ``s3://name``."""
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)
        fs.mkdir(name)
        return f"s3://{name}"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/moto-api/", timeout=1):
            return True
    except OSError:
        return False


def _wait_until_up(url: str, process: subprocess.Popen, timeout: float = 30.0) -> None:
    wait_until(lambda: process.poll() is not None or _answers(url), timeout)
    if process.poll() is not None:
        raise RuntimeError(f"moto server exited with {process.returncode} before answering")
    if not _answers(url):
        raise RuntimeError(f"moto server at {url} did not answer within {timeout} s")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """moto's S3 server on 127.0.0.1 for the whole session, with bucket ``pipeline-test``."""
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "server.log").open("w")
    env = {**os.environ, **CREDENTIALS}
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    endpoint = S3Endpoint(endpoint_url=f"http://127.0.0.1:{port}", bucket="pipeline-test")
    monkeypatch = pytest.MonkeyPatch()
    try:
        _wait_until_up(endpoint.endpoint_url, process)
        for key, value in endpoint.env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        endpoint.make_bucket(endpoint.bucket)
        yield endpoint
    finally:
        monkeypatch.undo()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture
def s3_proxy(s3_endpoint) -> Iterator[TcpProxy]:
    """A TCP proxy on 127.0.0.1 in front of the session's moto server; closed afterwards."""
    host, port = s3_endpoint.endpoint_url.removeprefix("http://").split(":")
    proxy = TcpProxy(host, int(port))
    yield proxy
    proxy.close()


@pytest.fixture(scope="session")
def s3_shards(s3_endpoint) -> str:
    """Procedural shapes at 32 px on moto's S3 (written directly, not through a proxy)."""
    url = s3_endpoint.url("faults", "shapes")
    options = s3_endpoint.storage_options
    write_shards(
        shapes(480, 32, seed=3), url, samples_per_shard=100, val_samples=64,
        storage_options=options, progress=False,
    )  # fmt: skip
    return url
