"""Running the writer's shard jobs: in this process, or one Ray task per shard on a cluster.

Ray is used when the caller asks for it, once connected (``start_ray`` joins ``RAY_ADDRESS`` or
starts a local cluster of ``workers`` CPUs). At most two tasks per CPU of the cluster are in
flight, so the driver holds a bounded number of jobs' sample lists, and every task streams its
samples: memory per task is a few images and one shard on local disk. The progress bar counts
images and shows an ETA; results come back in the order jobs finish.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tqdm import tqdm

TASKS_PER_CPU = 2  # one running, one queued: no CPU idles between tasks
TASK_RETRIES = 2  # a task lost with its node (not one that raised) runs again


def start_ray(workers: int | None) -> bool:
    """Join the cluster at ``RAY_ADDRESS``, or start a local one of ``workers`` CPUs on
    127.0.0.1; False when neither is asked for."""
    address = os.environ.get("RAY_ADDRESS")
    if not address and not workers:
        return False
    import ray  # deferred: ray takes seconds to import, and in-process writes need none

    if ray.is_initialized():
        return True
    if address:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(
            address="local",
            num_cpus=workers,
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=False,
        )
    return True


def _on_ray(fn: Callable, calls: Iterable[tuple], in_flight: int | None) -> Iterator[Any]:
    import ray  # deferred: only reached once Ray is connected

    remote = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(fn)
    limit = in_flight or TASKS_PER_CPU * max(1, int(ray.cluster_resources().get("CPU", 1)))
    pending: list = []
    calls = iter(calls)
    try:
        while True:
            for args in calls:
                pending.append(remote.remote(*args))
                if len(pending) >= limit:
                    break
            if not pending:
                return
            done, pending = ray.wait(pending, num_returns=1)
            try:
                yield ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:
                # The task's own exception (a StorageError naming the URL), not Ray's wrapper.
                raise exc.cause from None
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def run_calls(
    fn: Callable,
    calls: Iterable[tuple],
    *,
    total: int,
    count: Callable[[Any], int],
    progress: bool,
    desc: str,
    in_flight: int | None = None,
    use_ray: bool = False,
) -> Iterator[Any]:
    """``fn(*args)`` for each of ``calls``: one Ray task each with ``use_ray`` (connected
    first), else here one by one; the bar advances by ``count(result)`` of ``total`` images."""
    results = _on_ray(fn, calls, in_flight) if use_ray else (fn(*a) for a in calls)
    with tqdm(
        total=total, unit="img", desc=desc, disable=not progress, file=sys.stderr, smoothing=0.1
    ) as bar:
        for result in results:
            bar.update(count(result))
            yield result
