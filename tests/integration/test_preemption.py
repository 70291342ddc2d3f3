"""Spot and preemptible clusters, each fault made for real: a checkpoint upload cut off mid-way
(moto's S3 server behind the cuttable proxy) and a node drained through Ray's own drain API on
extra ``ray start --address`` nodes of the session's cluster on 127.0.0.1."""

from __future__ import annotations

import contextlib
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.run.ray_cluster import stop_ray_processes
from pipeline.tracking import CHECKPOINT_METRIC
from tests.helpers.cluster import wait_until
from tests.helpers.runs import ROOT, only_run
from tests.integration.test_faults import (
    CHECKPOINT_FILES,
    checkpoint_files,
    metric_by_step,
    registered_checkpoints,
    s3_checkpoints,
    s3_run_config,
    through_proxy,
    tiny_synthetic_config,
)
from tests.integration.test_faults import s3_proxy as _s3_proxy

s3_proxy = _s3_proxy  # the fault tests' cuttable proxy in front of moto, as a fixture here

pytestmark = pytest.mark.integration


# --- an upload that fails is never the restart point ------------------------------------------


@contextlib.contextmanager
def driver(cluster, config: Path, log_path: Path, **env: str) -> Iterator[subprocess.Popen]:
    """``python -m pipeline.pretrain`` in the background, its output into ``log_path``; killed
    if still running at the end."""
    command = [sys.executable, "-m", "pipeline.pretrain", "--config", str(config)]
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, env=cluster.env(**env), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def cut_during_an_upload(s3_endpoint, tmp_path, proxy, log_path: Path, seen: dict) -> None:
    """Once a checkpoint is registered, cut S3 while the next one is half stored; restore it
    once that upload failed for good."""

    def half_written() -> bool:
        folders, registered = s3_checkpoints(s3_endpoint, tmp_path)
        pending = sorted(set(folders) - set(registered))
        if len(pending) != 1:  # the one before is not registered yet: its snapshot needs S3
            return False
        files = checkpoint_files(s3_endpoint, tmp_path, pending[0])
        if 0 < len(files) < 4:
            seen.update(folder=pending[0], files=files, registered=registered)
            return True
        return False

    if wait_until(lambda: s3_checkpoints(s3_endpoint, tmp_path)[1], 300) and wait_until(
        half_written, timeout=120, interval=0.05
    ):
        seen["cut"] = time.time()
        proxy.cut()
        failed = f"{seen['folder']}: writing the checkpoint failed"
        seen["failed"] = wait_until(lambda: failed in log_path.read_text(), 120, interval=0.5)
        proxy.throttle(None)
        proxy.restore()


def test_a_checkpoint_whose_upload_fails_is_never_the_one_a_restart_picks(
    ray_cluster, mlflow_server, s3_endpoint, s3_proxy, tmp_path
):
    options = through_proxy(s3_endpoint, s3_proxy, config_kwargs={"retries": {"max_attempts": 1}})
    config = s3_run_config(
        tmp_path, "upcut", mlflow_server, s3_endpoint,
        "synthetic://?samples=64&resolution=16&classes=4", {},
        checkpoint={"storage_options": options}, train={"steps": 20},
        scaling={"max_failures": 1},
    )  # fmt: skip
    # ~160 kB per weights file at 40 kB/s: each upload takes seconds while training goes on.
    s3_proxy.throttle(40_000)
    seen: dict = {}
    log_path = tmp_path / "driver.log"
    with driver(ray_cluster, config, log_path) as process:
        cut_during_an_upload(s3_endpoint, tmp_path, s3_proxy, log_path, seen)
        returncode = process.wait(timeout=600)
    output = log_path.read_text()
    assert returncode == 0, output[-4000:]
    assert seen.get("failed"), f"no upload failed during a cut: {seen}"
    failed = seen["folder"]
    previous = int(seen["registered"][-1].removeprefix("step_"))
    assert previous < int(failed.removeprefix("step_"))
    # The restart picked the last checkpoint stored before the cut, not the half one.
    assert f"resumed from checkpoint at step {previous}" in output
    folders, registered = s3_checkpoints(s3_endpoint, tmp_path)
    assert folders == registered == [f"step_{step:09d}" for step in (5, 10, 15, 20)]
    for name in registered:  # the failed one written again, whole
        assert checkpoint_files(s3_endpoint, tmp_path, name) == sorted(
            [*CHECKPOINT_FILES, "state.json"]
        )
    experiment = f"{tmp_path.name}-upcut"
    client, run = only_run(mlflow_server, experiment)
    assert run.info.status == "FINISHED"
    # Each milestone once, the failed checkpoint's only from its upload after the restart.
    milestones = client.get_metric_history(run.info.run_id, CHECKPOINT_METRIC)
    assert sorted(m.step for m in milestones) == [5, 10, 15, 20]
    failed_step = int(failed.removeprefix("step_"))
    assert [m.timestamp / 1000 > seen["cut"] for m in milestones if m.step == failed_step] == [True]
    assert sorted(metric_by_step(mlflow_server, experiment, "train/loss")) == list(range(1, 21))
    uploads = metric_by_step(mlflow_server, experiment, "checkpoint/upload_seconds")
    assert sorted(uploads) == [5, 10, 15, 20] and all(s > 0 for s in uploads.values())
    lost = client.get_run(run.info.run_id).data.metrics["train/steps_lost"]
    print(f"cut with {failed} holding {seen['files']}; resumed at {previous}; lost {lost:.0f}")


# --- a drained node -----------------------------------------------------------------------------


def start_nodes(cluster, resources: list[str]) -> None:
    """Join one node per custom resource (2 CPUs, 2 of the shared ``spot`` slots) at once."""
    with ThreadPoolExecutor(len(resources)) as pool:
        list(pool.map(lambda r: cluster.add_node(num_cpus=2, resources=r), resources))


def worker_nodes(cluster) -> dict[str, str]:
    """actor id -> node id of the live Ray Train workers."""
    from ray.util.state import list_actors

    actors = list_actors(
        address=cluster.dashboard_url,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    return {actor.actor_id: actor.node_id for actor in actors}


def node_with(cluster, resource: str) -> str:
    """The id of the live node that has ``resource``."""
    from ray.util.state import list_nodes

    nodes = list_nodes(address=cluster.dashboard_url, filters=[("state", "=", "ALIVE")])
    (node,) = [n.node_id for n in nodes if resource in n.resources_total]
    return node


def step_reached(log_path: Path) -> int:
    """The last step the driver's output reports (rank 0's progress lines)."""
    steps = re.findall(r"step (\d+)/\d+ ", log_path.read_text())
    return int(steps[-1]) if steps else 0


def test_a_drained_nodes_run_checkpoints_at_once_and_loses_at_most_one_step(
    ray_cluster, mlflow_server, tmp_path
):
    tag = secrets.token_hex(3)
    spot, first, second = f"spot_{tag}", f"spot_a_{tag}", f"spot_b_{tag}"
    start_nodes(ray_cluster, [f'{{"{spot}": 2, "{name}": 1}}' for name in (first, second)])
    config = tiny_synthetic_config(
        tmp_path, "drain", mlflow_server,
        train={"steps": 200, "eval_every": 1000},
        checkpoint={"every_steps": 1000, "preemption_check_every": 1},
        scaling={"resources_per_worker": {spot: 1}},
    )  # fmt: skip
    poll = {"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5"}  # Ray's watcher: 5 s by default
    experiment = f"{tmp_path.name}-drain"
    log_path = tmp_path / "driver.log"
    try:
        with driver(ray_cluster, config, log_path, **poll) as process:
            assert wait_until(lambda: step_reached(log_path) >= 10, timeout=240)
            before = worker_nodes(ray_cluster)
            drained_node = next(iter(before.values()))
            drained = first if drained_node == node_with(ray_cluster, first) else second
            reached, drained_at = step_reached(log_path), time.time()
            subprocess.run(
                [
                    str(Path(sys.executable).parent / "ray"), "drain-node",
                    "--address", ray_cluster.address, "--node-id", drained_node,
                    "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                    "--reason-message", "spot instance reclaimed (test)",
                    "--deadline-remaining-seconds", "12",
                ],
                env=ray_cluster.env(), check=True, capture_output=True,
            )  # fmt: skip
            # At the deadline the node goes, as a reclaimed spot instance does.
            time.sleep(max(0.0, drained_at + 12 - time.time()))
            stop_ray_processes([drained], signal.SIGKILL)
            restarted = lambda: set(worker_nodes(ray_cluster)) - set(before)  # noqa: E731
            assert wait_until(restarted, timeout=240, interval=0.5)
            after = {worker_nodes(ray_cluster)[actor] for actor in restarted()}
            assert process.wait(timeout=300) == 0, log_path.read_text()[-4000:]
    finally:
        stop_ray_processes([first, second], signal.SIGKILL)
    output = log_path.read_text()
    saved = registered_checkpoints(tmp_path / "runs")
    notice_step = int(saved[0].removeprefix("step_"))
    assert saved == [f"step_{notice_step:09d}", "step_000000200"]  # the notice's, the last
    assert notice_step >= reached  # checkpointed after the drain, at a step boundary
    assert f"resumed from checkpoint at step {notice_step}" in output
    client, run = only_run(mlflow_server, experiment)  # the same MLflow run throughout
    assert run.info.status == "FINISHED"
    assert sorted(metric_by_step(mlflow_server, experiment, "train/loss")) == list(range(1, 201))
    lost = client.get_metric_history(run.info.run_id, "train/steps_lost")
    assert [m.step for m in lost] == [notice_step] and lost[0].value <= 1
    assert drained_node not in after  # the restarted workers run on the node left
    print(
        f"drained at step {reached}, checkpoint at {notice_step} "
        f"{time.time() - drained_at:.0f} s before the end, lost {lost[0].value:.0f}"
    )
