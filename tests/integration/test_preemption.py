"""Spot and preemptible clusters, each fault made for real: a checkpoint upload cut off mid-way
(moto's S3 server behind the cuttable proxy) and a node drained through Ray's own drain API on
extra ``ray start --address`` nodes of the session's cluster on 127.0.0.1."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import pytest

from pipeline.tracking import CHECKPOINT_METRIC
from tests.helpers.cluster import wait_until
from tests.helpers.faults import (
    CHECKPOINT_FILES,
    checkpoint_files,
    drain,
    driver,
    metric_by_step,
    node_with,
    registered_checkpoints,
    s3_checkpoints,
    s3_run_config,
    step_reached,
    through_proxy,
    tiny_synthetic_config,
    world_sizes,
)
from tests.helpers.runs import only_run

pytestmark = pytest.mark.integration


# --- an upload that fails is never the restart point ------------------------------------------


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


# --- a drained node, an elastic run ------------------------------------------------------------


def start_nodes(cluster, resources: list[str]) -> None:
    """Join one node per custom resource (2 CPUs, 2 of the shared ``spot`` slots)."""
    for r in resources:
        cluster.add_node(num_cpus=2, resources=r)


def worker_nodes(cluster) -> dict[str, str]:
    """actor id -> node id of the live Ray Train workers."""
    from ray.util.state import list_actors

    actors = list_actors(
        address=cluster.dashboard_url,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    return {actor.actor_id: actor.node_id for actor in actors}


def test_an_elastic_run_grows_when_a_node_joins_and_a_drain_costs_it_at_most_one_step(
    ray_cluster, mlflow_server, tmp_path
):
    """One spot slot per node, ``scaling.num_workers: [1, 2]``: the run starts on the one node
    there is, grows to 2 workers when a second joins, and when that node is drained checkpoints
    at the next step boundary (at most 1 step lost) and goes on with 1 worker on the node left;
    one MLflow run, every step logged once."""
    tag = secrets.token_hex(3)
    spot, first, second = (f"spot{s}_{tag}" for s in ("", "_a", "_b"))
    every, steps = 10, 600  # Ray's view of new nodes is refreshed every 20 s: the run outlasts it
    config = tiny_synthetic_config(
        tmp_path, "elastic", mlflow_server,
        train={"steps": steps, "eval_every": 1000},
        # Every checkpoint kept: the drain's must still be listed at the end.
        checkpoint={"every_steps": every, "preemption_check_every": 1, "keep": 100},
        scaling={
            "num_workers": [1, 2], "elastic_resize_interval_s": 2, "max_failures": -1,
            "resources_per_worker": {spot: 1},
        },
    )  # fmt: skip
    poll = {"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5"}  # Ray's watcher: 5 s by default
    experiment = f"{tmp_path.name}-elastic"
    log_path = tmp_path / "driver.log"
    try:
        start_nodes(ray_cluster, [f'{{"{spot}": 1, "{first}": 1}}'])
        with driver(ray_cluster, config, log_path, **poll) as process:
            # One node with a slot: the run starts on 1 worker (its minimum), not waiting for 2.
            assert wait_until(lambda: step_reached(log_path) >= 10, timeout=240)
            assert len(worker_nodes(ray_cluster)) == 1
            start_nodes(ray_cluster, [f'{{"{spot}": 1, "{second}": 1}}'])  # capacity comes
            grown = lambda: len(worker_nodes(ray_cluster)) == 2  # noqa: E731
            assert wait_until(grown, timeout=120, interval=0.5), log_path.read_text()[-3000:]
            on_two = step_reached(log_path)
            assert wait_until(lambda: step_reached(log_path) >= on_two + 5, timeout=120)
            before = worker_nodes(ray_cluster)
            drained_node = node_with(ray_cluster, second)
            reached, drained_at = step_reached(log_path), time.time()
            drain(ray_cluster, drained_node, 12)
            # At the deadline the node goes, as a reclaimed spot instance does.
            time.sleep(max(0.0, drained_at + 12 - time.time()))
            ray_cluster.remove_node(second)
            restarted = lambda: set(worker_nodes(ray_cluster)) - set(before)  # noqa: E731
            assert wait_until(restarted, timeout=240, interval=0.5), log_path.read_text()[-3000:]
            after = set(worker_nodes(ray_cluster).values())
            assert process.wait(timeout=300) == 0, log_path.read_text()[-4000:]
    finally:
        for name in (first, second):
            ray_cluster.remove_node(name, graceful=True)
    output = log_path.read_text()
    assert world_sizes(mlflow_server, experiment) == [1, 2, 1]
    assert drained_node not in after  # the shrunk run goes on on the node left
    client, run = only_run(mlflow_server, experiment)  # the same MLflow run throughout
    assert run.info.status == "FINISHED"
    # Every step once, though the steps after a restart's checkpoint were trained again.
    losses = metric_by_step(mlflow_server, experiment, "train/loss")
    assert sorted(losses) == list(range(1, steps + 1))
    history = client.get_metric_history(run.info.run_id, "train/steps_lost")
    grew, shrank = sorted(history, key=lambda m: m.step)
    # Growing restarts from the newest stored checkpoint: Ray Train resizes between checkpoints,
    # and the newest may still be uploading (27 steps lost at a 10-step interval was seen).
    assert "on 2 workers x 1 micro-batches each (written on 1 x 2)" in output
    assert grew.value <= 4 * every
    # The drain: a checkpoint at the next step boundary, the restart from it.
    notice_step = shrank.step
    assert notice_step >= reached and shrank.value - grew.value <= 1
    assert f"step_{notice_step:09d}" in registered_checkpoints(tmp_path / "runs")
    assert (
        f"resumed from checkpoint at step {notice_step} on 1 workers x 2 micro-batches each "
        "(written on 2 x 1)"
    ) in output
    print(
        f"grew after losing {grew.value:.0f} steps; drained at step {reached}, checkpoint at "
        f"{notice_step}, lost {shrank.value - grew.value:.0f}"
    )
