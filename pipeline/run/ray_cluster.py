"""The Ray cluster a run uses: joining or starting one, its local environment, its job states.

A driver joins the cluster at ``RAY_ADDRESS`` (as under ``ray job submit``) or starts a local one
bound to 127.0.0.1. A local cluster is stopped by signalling its own processes, never by
``ray stop`` (which stops every Ray on the machine).
"""

from __future__ import annotations

import os
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# States of a Ray job (ray.job_submission.JobStatus) by outcome.
RAY_JOB_SUCCEEDED = frozenset({"SUCCEEDED"})
RAY_JOB_FAILED = frozenset({"FAILED", "STOPPED"})
RAY_JOB_ENDED = RAY_JOB_SUCCEEDED | RAY_JOB_FAILED


def job_state(status: Any) -> str:
    """``"SUCCEEDED"`` from a JobStatus or its text (``"JobStatus.SUCCEEDED"``)."""
    return str(status).split(".")[-1]


def local_ray_env(**extra: str) -> dict[str, str]:
    """The environment of a local Ray cluster and the jobs it runs, plus ``extra``.

    This interpreter's ``bin`` comes first on ``PATH``, so ``python`` in a job's entrypoint is the
    project's; DeepSpeed runs on the CPU; no usage statistics; no token authentication (a
    loopback-only cluster, and a token file in ``~/.ray`` would otherwise switch it on for the
    head but not for the CLI).
    """
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        DS_ACCELERATOR="cpu",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="disabled",
    )
    env.update(extra)
    return env


def connect_ray(address: str | None) -> None:
    """Join the cluster at ``address``/``RAY_ADDRESS``, or start a local one on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            include_dashboard=True,
            dashboard_host="127.0.0.1",
        )


def ray_head_answers(dashboard_url: str, timeout: float = 2.0) -> bool:
    """Whether a Ray job server answers at ``dashboard_url`` (``http://host:port``)."""
    try:
        urllib.request.urlopen(f"{dashboard_url}/api/version", timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # it answers (401 with token authentication)
    except OSError:
        return False
    return True


def stop_ray_processes(marks: Sequence[str], sig: int = signal.SIGTERM) -> int:
    """Signal the processes of one local Ray cluster and all their descendants.

    A process belongs to the cluster when its command line holds a mark (its ``--temp-dir``, its
    GCS address). Ray's agents retitle themselves ("ray::DashboardAgent") and hold no mark, so
    descendants are signalled too: an agent whose raylet is gone keeps writing into the cluster's
    folder. Returns how many processes were signalled.
    """
    import psutil

    me = os.getpid()
    targets: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if process.pid == me or not any(mark in cmdline for mark in marks):
            continue
        targets[process.pid] = process
        try:
            targets.update({child.pid: child for child in process.children(recursive=True)})
        except psutil.Error:  # gone meanwhile, or not ours to read
            pass
    targets.pop(me, None)
    signalled = 0
    for process in targets.values():
        try:
            process.send_signal(sig)
            signalled += 1
        except psutil.Error:  # gone meanwhile
            pass
    return signalled
