"""What the fault, preemption and chaos tests share: small run configs, the cuttable S3 proxy's
options, a driver in the background, and readers of what a run left behind (MLflow metrics,
checkpoints on S3, Ray's live actors and nodes) and Ray's drain API."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.fixtures.tcp_proxy import TcpProxy
from tests.helpers.runs import ROOT, only_run, small_run_config

CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors")


def tiny_synthetic_config(
    tmp_path: Path, name: str, tracking_uri: str, url_extra: str = "", **sections
):
    """nfnet_nano on 16 px synthetic data, 2 workers × micro-batch 8, a checkpoint every 2 steps."""
    url = f"synthetic://?samples=64&resolution=16&classes=4{url_extra}"
    merged = {
        "data": {"train_url": url},
        "train": {"steps": 6, "eval_every": 100, "eval_batches": 1},
        "checkpoint": {"every_steps": 2, "keep": 10},
    }
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    return small_run_config(tmp_path, name, tracking_uri, **merged)


def metric_by_step(uri: str, experiment: str, key: str) -> dict[int, float]:
    client, run = only_run(uri, experiment)
    history = client.get_metric_history(run.info.run_id, key)
    assert len({m.step for m in history}) == len(history), "a step was logged twice"
    return {m.step: m.value for m in history}


def alive_train_actors(cluster) -> dict[int, str]:
    """``{pid: class name}`` of the live Ray Train actors (controller, workers) of the cluster."""
    from ray.util.state import list_actors

    actors = list_actors(address=cluster.dashboard_url, filters=[("state", "=", "ALIVE")])
    return {a.pid: a.class_name for a in actors if "Train" in a.class_name}


def train_workers(cluster) -> dict[str, int]:
    """``{actor id: pid}`` of the live Ray Train workers of the cluster. A run's own are those
    not listed before it started: a finished run's workers can still be listed alive for a
    moment, and after the pid counter wraps a newer worker can have the smaller pid."""
    from ray.util.state import list_actors

    actors = list_actors(
        address=cluster.dashboard_url,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    return {actor.actor_id: actor.pid for actor in actors}


def registered_checkpoints(runs: Path) -> list[str]:
    """The checkpoints Ray Train's snapshot lists: those a restarted run can resume from."""
    found = set()
    for snapshot in runs.glob("*/checkpoint_manager_snapshot.json"):
        try:
            found |= set(re.findall(r"step_\d{9}", snapshot.read_text()))
        except OSError:
            continue
    return sorted(found)


def through_proxy(s3_endpoint, proxy: TcpProxy, **extra) -> dict:
    """s3fs options that reach moto through ``proxy``."""
    options = s3_endpoint.storage_options
    return {**options, "client_kwargs": {"endpoint_url": proxy.endpoint_url}, **extra}


def s3_run_config(tmp_path, name, mlflow_server, s3_endpoint, shards, options, **sections):
    """Shards and checkpoints both on S3 through the proxy; nfnet_nano, 2 workers."""
    merged = {
        "data": {"train_url": shards, "storage_options": options},
        "checkpoint": {
            "storage_url": s3_endpoint.url("fault-runs", tmp_path.name),
            "storage_options": options,
            "every_steps": 5,
            "keep": 10,
        },
        "train": {"steps": 40, "eval_every": 1000, "eval_batches": 1},
    }
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    return small_run_config(tmp_path, name, mlflow_server, **merged)


def s3_checkpoints(s3_endpoint, tmp_path) -> tuple[list[str], list[str]]:
    """(checkpoint folders in the bucket, those Ray Train's snapshot lists), read past the proxy."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_endpoint.storage_options)
    root = f"{s3_endpoint.bucket}/fault-runs/{tmp_path.name}"
    folders = sorted(path.rsplit("/", 1)[-1] for path in fs.glob(f"{root}/*/step_*"))
    registered = set()
    for snapshot in fs.glob(f"{root}/*/checkpoint_manager_snapshot.json"):
        registered |= set(re.findall(r"step_\d{9}", fs.cat_file(snapshot).decode()))
    return folders, sorted(registered)


def checkpoint_files(s3_endpoint, tmp_path, name: str) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_endpoint.storage_options)
    root = f"{s3_endpoint.bucket}/fault-runs/{tmp_path.name}"
    return sorted(path.rsplit("/", 1)[-1] for path in fs.glob(f"{root}/*/{name}/*"))


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


def node_with(cluster, resource: str) -> str:
    """The id of the live node that has ``resource``."""
    from ray.util.state import list_nodes

    # Filtered here: with a state filter, Ray counts the dead nodes in its total and raises that
    # the answer was truncated.
    nodes = list_nodes(address=cluster.dashboard_url)
    (node,) = [n.node_id for n in nodes if n.state == "ALIVE" and resource in n.resources_total]
    return node


def step_reached(log_path: Path) -> int:
    """The last step the driver's output reports (rank 0's progress lines)."""
    steps = re.findall(r"step (\d+)/\d+ ", log_path.read_text())
    return int(steps[-1]) if steps else 0


def world_sizes(uri: str, experiment: str) -> list[int]:
    """The run's ``train/world_size`` in the order it was logged, repeats dropped."""
    client, run = only_run(uri, experiment)
    history = client.get_metric_history(run.info.run_id, "train/world_size")
    sizes = [int(m.value) for m in sorted(history, key=lambda m: (m.timestamp, m.step))]
    return [size for i, size in enumerate(sizes) if i == 0 or size != sizes[i - 1]]


def drain(cluster, node_id: str, deadline_s: int) -> None:
    """``ray drain-node`` as a spot reclaim: a preemption with a deadline."""
    subprocess.run(
        [
            str(Path(sys.executable).parent / "ray"), "drain-node",
            "--address", cluster.address, "--node-id", node_id,
            "--reason", "DRAIN_NODE_REASON_PREEMPTION",
            "--reason-message", "spot instance reclaimed (test)",
            "--deadline-remaining-seconds", str(deadline_s),
        ],
        env=cluster.env(), check=True, capture_output=True,
    )  # fmt: skip
