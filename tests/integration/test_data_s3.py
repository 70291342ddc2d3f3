"""Shards on a real S3 endpoint (moto's server over HTTP on 127.0.0.1) and on file://."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import shards
from pipeline.data.info import read_info
from pipeline.data.reader import make_eval_loader, make_train_loader
from pipeline.data.sources import shapes
from pipeline.data.storage import StorageError, find_files, read_bytes
from pipeline.data.writer import write_shards
from tests.helpers.cluster import free_port
from tests.helpers.images import IndexedSource

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
TRAIN = dict(
    batch_size=4,
    batches_per_epoch=5,
    world_size=2,
    num_workers=2,
    resolution=24,
    randaugment_layers=2,
    randaugment_magnitude=5,
    shuffle_buffer=8,
)


@pytest.fixture(params=["file", "s3"])
def place(request, tmp_path) -> tuple[str, dict | None]:
    """A fresh dataset URL and its storage options, on local disk or on the S3 endpoint."""
    if request.param == "file":
        return f"file://{tmp_path}/indexed", None
    endpoint = request.getfixturevalue("s3_endpoint")
    return endpoint.url(f"indexed-{os.urandom(4).hex()}"), endpoint.storage_options


def _labels(loader) -> list[int]:
    """Each sample's own label: training batches carry MixTargets, evaluation batches labels."""
    return [int(x) for _, batch in loader for x in getattr(batch, "labels", batch)]


def test_write_inspect_read(place, tmp_path, capsys):
    url, options = place
    write_shards(
        IndexedSource(60),
        url,
        samples_per_shard=8,
        val_samples=18,
        seed=0,
        storage_options=options,
        progress=False,
    )
    # inspect finds the endpoint through the standard environment (AWS_ENDPOINT_URL)
    assert shards.main(["inspect", url, "--verify", "--grid", str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out
    assert "split train: 42 samples in 6 shards" in out and "read 42 samples" in out
    assert "split validation: 18 samples in 3 shards" in out and "read 18 samples" in out

    validation = []
    for rank in range(2):
        loader = make_eval_loader(
            url,
            batch_size=4,
            rank=rank,
            world_size=2,
            num_workers=2,
            resolution=24,
            storage_options=options,
        )
        labels = _labels(loader)
        assert len(labels) == 9 and loader.skipped() == 0
        validation += labels
    info = read_info(url, options)
    assert len(set(validation)) == 18 == info.split("validation").num_samples

    runs = {}
    for rank, epoch in ((0, 0), (1, 0), (0, 0), (0, 1)):
        loader = make_train_loader(
            url, **TRAIN, rank=rank, epoch=epoch, seed=5, storage_options=options
        )
        batches = list(loader)
        assert len(batches) == 5 and all(b[0].shape == (4, 3, 24, 24) for b in batches)
        assert not set(_labels(batches)) & set(validation)
        if (rank, epoch) in runs:  # same seed, epoch and rank: identical tensors
            assert all(
                torch.equal(a[0], b[0]) for a, b in zip(batches, runs[(rank, epoch)], strict=True)
            )
        runs[(rank, epoch)] = batches
    assert _labels(runs[(0, 0)]) != _labels(runs[(0, 1)])


def test_cli_write_to_s3_gives_the_bytes_of_a_local_write(s3_endpoint, tmp_path):
    url = s3_endpoint.url("shapes-cli")
    options = [
        "--num-samples",
        "40",
        "--resolution",
        "32",
        "--samples-per-shard",
        "16",
        "--val-samples",
        "8",
        "--seed",
        "2",
        "--quiet",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.shards", "write", "shapes", url, *options],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    local = tmp_path / "shapes"
    write_shards(
        shapes(40, 32, seed=2),
        str(local),
        samples_per_shard=16,
        val_samples=8,
        seed=2,
        progress=False,
    )
    remote = {path: read_bytes(f"{url}/{path}") for path in find_files(url)}
    assert remote == {str(p.relative_to(local)): p.read_bytes() for p in local.rglob("*.*")}
    assert len(remote) == 8  # 2 train shards, 1 validation shard, their records, 2 json files


def test_missing_s3_objects_are_named(s3_endpoint, capsys):
    url = s3_endpoint.url("no-such-dataset")
    with pytest.raises(StorageError, match=f"{url}/_info.json: does not exist"):
        read_info(url, s3_endpoint.storage_options)
    with pytest.raises(StorageError, match="s3://no-such-bucket-x/data/_info.json"):
        read_info("s3://no-such-bucket-x/data", s3_endpoint.storage_options)
    assert shards.main(["inspect", url]) == 2
    assert f"{url}/_info.json" in capsys.readouterr().err


def test_refused_connection_exits_2_naming_the_url(monkeypatch, capsys):
    import json

    from pipeline.data import storage

    monkeypatch.setattr(storage, "RETRY_BACKOFF", 0.01)  # the retries still happen, quickly
    port = free_port()  # nobody listens there: connections are refused
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
    }
    argv = ["--storage-options", json.dumps(options), "inspect", "s3://pipeline-test/refused"]
    assert shards.main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: s3://pipeline-test/refused/_info.json: EndpointConnectionError")
