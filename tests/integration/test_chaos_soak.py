"""The chaos soak (``python -m pipeline.bench chaos``, or ``pytest ... --chaos-faults N``).

One elastic run of ``nfnet_micro`` (``scaling.num_workers: [1, 2]``, one worker slot on each of
two extra ``ray start`` nodes of the session's cluster on 127.0.0.1), shards and checkpoints on
moto's S3 behind the cuttable TCP proxy, MLflow over HTTP, and a seeded schedule of faults of
every kind: a training worker killed, a node drained with a deadline (then gone, and back
later), a node killed without notice (and back later), S3 cut for seconds, the driver killed and
the same command run again. The run must finish in one MLflow run with every step logged once,
never resume from a checkpoint that was not stored whole, and end with the parameters of the
same run trained without a fault on a fixed 2 workers (within 1e-5: the worker count changes
the order of the fp32 sums). Skipped unless ``--chaos-faults`` is given.
"""

from __future__ import annotations

import json
import math
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers.cluster import wait_until
from tests.helpers.faults import (
    CHECKPOINT_FILES,
    alive_train_actors,
    checkpoint_files,
    drain,
    metric_by_step,
    node_with,
    s3_checkpoints,
    step_reached,
    through_proxy,
    train_workers,
    world_sizes,
)
from tests.helpers.runs import ROOT, max_relative_difference, only_run, small_run_config

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

KINDS = ("worker killed", "node drained", "node killed", "S3 cut", "driver killed")


def fault_schedule(seed: int, count: int) -> list[str]:
    """``count`` faults, every kind at least once when ``count`` allows, in a seeded order."""
    kinds = (list(KINDS) * math.ceil(count / len(KINDS)))[:count]
    random.Random(seed).shuffle(kinds)
    return kinds


class Driver:
    """``python -m pipeline.pretrain`` in the background, run again after a kill; one log."""

    def __init__(self, cluster, config: Path, log_path: Path) -> None:
        self.cluster, self.config, self.log_path = cluster, config, log_path
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        command = [sys.executable, "-m", "pipeline.pretrain", "--config", str(self.config)]
        env = self.cluster.env(RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S="0.5")
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(
                command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        self.starts += 1

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def step(self) -> int:
        return step_reached(self.log_path)


def workers(cluster, earlier: set) -> list[int]:
    """The pids of the live training workers not listed in ``earlier`` (the reference run's)."""
    return [pid for actor, pid in train_workers(cluster).items() if actor not in earlier]


def test_chaos_soak(
    ray_cluster, mlflow_server, s3_endpoint, s3_shards, s3_proxy, tmp_path, request
):
    count = request.config.getoption("--chaos-faults")
    seed = request.config.getoption("--chaos-seed")
    schedule = fault_schedule(seed, count)
    tag = secrets.token_hex(3)
    slot = f"chaos_{tag}"
    options = through_proxy(s3_endpoint, s3_proxy)
    steps, every = 40 * (count + 2), 10

    def run_folder(name: str) -> Path:  # what the fault tests' S3 helpers take
        return tmp_path.parent / f"{tmp_path.name}-{name}"

    def config(name: str, scaling: dict) -> Path:
        return small_run_config(
            tmp_path, name, mlflow_server,
            model={"name": "nfnet_micro"},
            data={"train_url": s3_shards, "storage_options": options},
            checkpoint={"storage_url": s3_endpoint.url("fault-runs", run_folder(name).name),
                        "storage_options": options, "every_steps": every, "keep": 3,
                        "preemption_check_every": 1},
            train={"steps": steps, "eval_every": 10**6, "log_every": 1},
            scaling={"max_failures": -1, "resources_per_worker": {slot: 1}, **scaling},
        )  # fmt: skip

    names = {"a": f"chaos_a_{tag}", "b": f"chaos_b_{tag}"}
    resources = {key: f'{{"{slot}": 1, "{name}": 1}}' for key, name in names.items()}
    injected: list[dict] = []
    try:
        for key in names:
            ray_cluster.add_node(num_cpus=2, resources=resources[key])
        # The reference: the same run without a fault, on a fixed 2 workers.
        tick = time.monotonic()
        reference = Driver(
            ray_cluster, config("reference", {"num_workers": 2}), tmp_path / "ref.log"
        )
        reference.start()
        assert reference.process.wait(timeout=900) == 0, reference.log_path.read_text()[-3000:]
        reference_s = time.monotonic() - tick

        earlier = set(train_workers(ray_cluster))
        tick = time.monotonic()
        chaos = Driver(
            ray_cluster,
            config("chaos", {"num_workers": [1, 2], "elastic_resize_interval_s": 2}),
            tmp_path / "chaos.log",
        )
        chaos.start()
        for index, kind in enumerate(schedule):
            at = (index + 1) * steps // (count + 2)
            assert wait_until(lambda at=at: chaos.step() >= at, timeout=600), kind
            assert wait_until(lambda: len(workers(ray_cluster, earlier)) == 2, timeout=180), kind
            fault = {"kind": kind, "step": chaos.step(), "time": time.monotonic() - tick}
            if kind == "worker killed":
                os.kill(workers(ray_cluster, earlier)[0], signal.SIGKILL)
            elif kind == "S3 cut":
                s3_proxy.cut()
                time.sleep(5)
                s3_proxy.restore()
            elif kind == "driver killed":
                chaos.kill()
                assert wait_until(lambda: not alive_train_actors(ray_cluster), timeout=60)
                chaos.start()  # the same command again
            else:
                key = random.Random(seed + index).choice(sorted(names))
                node = node_with(ray_cluster, names[key])
                if kind == "node drained":
                    drain(ray_cluster, node, 10)
                    time.sleep(10)
                ray_cluster.remove_node(names[key])
                shrunk = lambda: len(workers(ray_cluster, earlier)) == 1  # noqa: E731
                assert wait_until(shrunk, timeout=240, interval=0.5), kind
                ray_cluster.add_node(num_cpus=2, resources=resources[key])  # capacity comes back
            injected.append(fault)
        assert chaos.process.wait(timeout=900) == 0, chaos.log_path.read_text()[-4000:]
        chaos_s = time.monotonic() - tick
    finally:
        chaos_driver = locals().get("chaos")
        if chaos_driver is not None:
            chaos_driver.kill()
        if not s3_proxy.listening:
            s3_proxy.restore()
        for name in names.values():
            ray_cluster.remove_node(name, graceful=True)

    experiment = f"{tmp_path.name}-chaos"
    client, run = only_run(mlflow_server, experiment)  # one MLflow run over every restart
    assert run.info.status == "FINISHED"
    assert sorted(metric_by_step(mlflow_server, experiment, "train/loss")) == list(
        range(1, steps + 1)
    )  # every step once
    # Every checkpoint a restart could pick was stored whole.
    _, registered = s3_checkpoints(s3_endpoint, run_folder("chaos"))
    assert registered
    for name in registered:
        assert checkpoint_files(s3_endpoint, run_folder("chaos"), name) == sorted(
            [*CHECKPOINT_FILES, "state.json"]
        ), name
    finals = {name: final_weights(s3_endpoint, run_folder(name)) for name in ("reference", "chaos")}
    difference = max_relative_difference(finals["chaos"], finals["reference"])
    lost = client.get_run(run.info.run_id).data.metrics.get("train/steps_lost", 0.0)
    report = {
        "faults": {kind: schedule.count(kind) for kind in KINDS},
        "injected": injected,
        "survived": len(injected),
        "driver_starts": chaos.starts,
        "world_sizes": world_sizes(mlflow_server, experiment),
        "max_relative_difference": difference,
        "steps_lost": lost,
        "steps": steps,
        "reference_s": reference_s,
        "chaos_s": chaos_s,
        "overhead": chaos_s / reference_s,
    }
    out = request.config.getoption("--chaos-report")
    if out:
        Path(out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    assert difference <= 1e-5, difference


def final_weights(s3_endpoint, folder: Path) -> dict:
    """The raw weights of the newest checkpoint of the run stored under ``folder``'s name."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_endpoint.storage_options)
    latest = sorted(fs.glob(f"{s3_endpoint.bucket}/fault-runs/{folder.name}/*/step_*"))[-1]
    local = folder.parent / f"{folder.name}.safetensors"
    fs.get(f"{latest}/model.safetensors", str(local))
    return load_file(local)
