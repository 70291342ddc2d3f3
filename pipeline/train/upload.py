"""A checkpoint's upload in a process of its own, at a lower CPU priority than training.

``copy_in_child`` runs ``python -m pipeline.train.upload`` with its request (the staged folder,
the destination URL, the storage options) on stdin, never on a command line: the copy's CPU (the
S3 client's Python, TLS, HTTP) and its share of a GIL stay out of the training process, and its
``nice`` level gives training the cores first. The child imports fsspec and
``pipeline.data.storage`` only (no torch: it starts in a fraction of a second). Each file is
put with the storage layer's retries, then its stored size is checked (a connection reset
mid-way can end a put without an error); what still fails comes back as a StorageError naming
the URL.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from fsspec.implementations.local import LocalFileSystem

import pipeline
from pipeline.data.storage import StorageError, call_with_retries, filesystem, join_url

PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Where the child finds this package, whatever the caller's working directory (a Ray worker's).
_ROOT = str(Path(pipeline.__file__).resolve().parents[1])


def copy_folder(staged: str, url: str, storage_options: dict[str, Any]) -> None:
    """Copy every file of the flat folder ``staged`` to the folder ``url``, each checked; on a
    failure, remove what was copied (it is never registered) and raise the StorageError."""
    fs, path = filesystem(url, storage_options)
    if isinstance(fs, LocalFileSystem):  # object stores have no folders to make
        call_with_retries(url, lambda: fs.makedirs(path, exist_ok=True))
    for file in sorted(Path(staged).iterdir()):
        target, size = join_url(path, file.name), file.stat().st_size

        def put(file: Path = file, target: str = target, size: int = size) -> None:
            fs.put_file(str(file), target)
            fs.invalidate_cache(target)
            stored = fs.size(target)
            if stored != size:
                raise ConnectionError(f"{file.name} stored with {stored} of {size} bytes")

        try:
            call_with_retries(join_url(url, file.name), put)
        except StorageError:
            with contextlib.suppress(Exception):  # a full disk fills other writers' way too
                fs.rm(path, recursive=True)
            raise


def copy_in_child(
    staged: str, url: str, storage_options: dict[str, Any], nice: int
) -> dict[str, Any]:
    """``copy_folder`` in a child process ``nice`` levels below this one; raise its StorageError
    in this one. Returns the child's report: ``{"nice": the level it ran at}``."""
    request = {
        "staged": staged,
        "url": url,
        "storage_options": storage_options,
        "nice": nice,
        "parent": os.getpid(),
    }
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.train.upload"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        env=env,
    )
    lines = result.stdout.strip().splitlines()
    if result.returncode == 0:
        return json.loads(lines[-1])
    if result.returncode == 1 and lines:
        failure = json.loads(lines[-1])
        raise StorageError(failure["url"], failure["reason"])
    raise StorageError(
        url, f"the upload process ended with code {result.returncode}: {result.stderr[-2000:]}"
    )


def _die_with(parent: int) -> None:
    """End this process when ``parent`` ends (Linux): a killed worker takes its upload with it,
    never leaving a copy that nobody waits for writing into the folder its restart writes."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # ended before the line above
        os._exit(1)


def main() -> int:
    """The child: the request from stdin, the copy, its report (or failure) as JSON on stdout."""
    request = json.loads(sys.stdin.read())
    _die_with(request.pop("parent"))
    level = os.nice(request.pop("nice"))
    try:
        copy_folder(**request)
    except StorageError as exc:
        print(json.dumps({"url": exc.url, "reason": exc.reason}), flush=True)
        return 1
    print(json.dumps({"nice": level}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
