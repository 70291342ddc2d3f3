"""pipeline.train.upload: a checkpoint copied by a child process at a lower CPU priority."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from pipeline.data.storage import StorageError
from pipeline.train.upload import copy_in_child
from tests.helpers.cluster import wait_until
from tests.helpers.runs import ROOT


def staged_folder(tmp_path: Path) -> Path:
    staged = tmp_path / "staged"
    staged.mkdir()
    for name, size in {"model.safetensors": 3_000_001, "state.json": 17, "empty": 0}.items():
        (staged / name).write_bytes(os.urandom(size))
    return staged


def test_the_upload_process_copies_every_file_at_a_lower_priority(tmp_path):
    staged = staged_folder(tmp_path)
    target = tmp_path / "store" / "run" / "step_000000001"
    report = copy_in_child(str(staged), f"file://{target}", {}, 7)
    assert report == {"nice": min(19, os.nice(0) + 7)}
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in staged.iterdir())
    for file in staged.iterdir():
        assert (target / file.name).read_bytes() == file.read_bytes()


def test_a_destination_storage_refuses_fails_naming_its_url_at_once(tmp_path):
    staged = staged_folder(tmp_path)
    (tmp_path / "blocker").write_text("a file where the run's folder should be")
    url = f"file://{tmp_path}/blocker/step_000000001"
    with pytest.raises(StorageError, match=re.escape(f"{tmp_path}/blocker")) as failure:
        copy_in_child(str(staged), url, {}, 0)
    assert "Error" in failure.value.reason


PARENT = """
import sys
from pipeline.train.upload import copy_in_child
from tests.helpers.runs import ROOT
from tests.helpers.cluster import wait_until
options = {"endpoint_url": sys.argv[2], "key": "k", "secret": "s", "skip_instance_cache": True}
copy_in_child(sys.argv[1], "s3://bucket/run/step_000000001", options, 0)
"""


def test_a_killed_worker_takes_its_upload_process_with_it(tmp_path):
    """The child of a process killed mid-upload ends too: no orphan goes on writing into the
    folder that the restarted run writes again."""
    staged = staged_folder(tmp_path)
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers: the upload hangs
    endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(staged), endpoint], cwd=ROOT)
    try:
        assert wait_until(lambda: psutil.Process(parent.pid).children(), timeout=30)
        (child,) = psutil.Process(parent.pid).children()
        assert wait_until(lambda: child.net_connections(), timeout=30)  # uploading
        parent.kill()
        parent.wait()
        assert wait_until(lambda: not child.is_running(), timeout=10)
    finally:
        parent.kill()
        silent.close()
