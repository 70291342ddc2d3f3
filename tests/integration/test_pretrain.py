"""Distributed pretraining with real components: a Ray head on 127.0.0.1, Ray Train workers
running DeepSpeed with gloo, shards on disk or on moto's S3 server, MLflow over HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from ray.job_submission import JobSubmissionClient
from safetensors.torch import load_file

from pipeline.data.sources import shapes
from pipeline.data.writer import write_shards
from pipeline.run.ray_cluster import job_state
from tests.helpers.cluster import wait_until
from tests.helpers.faults import registered_checkpoints, train_workers
from tests.helpers.runs import (
    ROOT,
    checked,
    max_relative_difference,
    only_run,
    run_pretrain,
    small_run_config,
)

pytestmark = pytest.mark.integration


def final_weights(tmp_path: Path) -> dict:
    """The raw weights of the newest checkpoint under ``tmp_path/runs``."""
    latest = sorted((tmp_path / "runs").glob("*/step_*"))[-1]
    return load_file(latest / "model.safetensors")


@pytest.fixture(scope="module")
def shapes_shards(tmp_path_factory) -> str:
    """Procedural shapes at 32 px on the local disk."""
    url = f"file://{tmp_path_factory.mktemp('shards')}/shapes"
    write_shards(
        shapes(480, 32, seed=0), url, samples_per_shard=100, val_samples=64, progress=False
    )
    return url


def test_ray_job_submit_runs_the_demo_and_mlflow_holds_the_run(
    ray_cluster, mlflow_server, shapes_shards, tmp_path
):
    config = small_run_config(
        tmp_path,
        "job",
        mlflow_server,
        data={"train_url": shapes_shards},
        tracking={"experiment": "job-submit", "registered_model": "nano"},
        train={"steps": 10},
    )
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "ray"), "job", "submit",
            "--address", ray_cluster.dashboard_url,
            "--working-dir", str(ROOT),
            "--", "python", "-m", "pipeline.pretrain", "--config", str(config),
        ],
        env=ray_cluster.env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )  # fmt: skip
    output = checked(result)
    # Each worker line reaches the console once: Ray Train's workers print the root logger's
    # records too, and the pipeline's stay off it.
    assert [output.count(f"step {step}/10 ") for step in range(1, 11)] == [1] * 10
    jobs = JobSubmissionClient(ray_cluster.dashboard_url).list_jobs()
    (job,) = [job for job in jobs if str(config) in job.entrypoint]
    assert job_state(job.status) == "SUCCEEDED"
    client, run = only_run(mlflow_server, "job-submit")
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "nfnet_nano"
    assert run.data.params["train.global_batch"] == "16"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, 11))
    assert len(client.get_metric_history(run.info.run_id, "val/top1_ema")) == 2  # steps 5, 10
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "weights"} <= artifacts
    weights = {a.path for a in client.list_artifacts(run.info.run_id, "weights")}
    assert weights == {"weights/model.safetensors", "weights/ema.safetensors"}  # raw and EMA
    (version,) = client.search_model_versions("name = 'nano'")
    assert version.run_id == run.info.run_id
    assert version.source.endswith("/weights/ema.safetensors")  # DM reports the EMA weights
    assert version.tags["pipeline.weights"] == "ema"
    checkpoints = sorted((tmp_path / "runs").glob("*/step_*"))
    assert [c.name for c in checkpoints] == ["step_000000005", "step_000000010"]
    assert {p.name for p in checkpoints[-1].iterdir()} >= {
        "model.safetensors",
        "ema.safetensors",
        "optimizer.safetensors",
        "state.json",
    }


def test_two_workers_equal_one_worker_accumulating_two_micro_batches(
    ray_cluster, mlflow_server, tmp_path
):
    synthetic = "synthetic://?samples=256&resolution=32&classes=10"
    common = {
        # DM's recipe: disjoint pairs, MixUp on half of each micro-batch and CutMix on the other,
        # then RandAugment on the mixed images, each seeded by its global sample.
        "data": {
            "train_url": synthetic,
            "mixup_alpha": 0.2,
            "cutmix": True,
            "augment_before_mix": False,
            "randaugment_layers": 2,
            "randaugment_magnitude": 9,
        },
        "optim": {"clipping": 0.01, "lr": 0.4},
        # Timing the all-reduce wraps DeepSpeed's call; it must not change a single number.
        "train": {"steps": 5, "eval_every": 100, "time_allreduce": True},
    }
    runs = {}
    for workers in (2, 1):
        folder = tmp_path / f"w{workers}"
        folder.mkdir()
        sections = {key: dict(value) for key, value in common.items()}
        sections["scaling"] = {"num_workers": workers}
        config = small_run_config(folder, "exact", mlflow_server, **sections)
        checked(run_pretrain(ray_cluster, config))
        runs[workers] = folder
    # 2 workers × micro 8 × accumulation 1  ==  1 worker × micro 8 × accumulation 2
    difference = max_relative_difference(final_weights(runs[2]), final_weights(runs[1]))
    assert difference <= 1e-5
    client, run = only_run(mlflow_server, "w2-exact")
    clipped = [
        m.value for m in client.get_metric_history(run.info.run_id, "train/agc_clip_fraction")
    ]
    assert len(clipped) == 5 and min(clipped) > 0  # AGC clipped units at every step
    shares = [
        m.value for m in client.get_metric_history(run.info.run_id, "train/allreduce_fraction")
    ]
    assert len(shares) == 5 and all(0 < share < 1 for share in shares)


def test_resumed_run_equals_uninterrupted_run_on_s3(
    ray_cluster, mlflow_server, s3_endpoint, tmp_path
):
    shards = s3_endpoint.url("resume", "shapes")
    write_shards(
        shapes(480, 32, seed=1),
        shards,
        samples_per_shard=100,
        val_samples=64,
        storage_options=s3_endpoint.storage_options,
        progress=False,
    )
    storage = {"storage_options": s3_endpoint.storage_options}
    runs = {}
    for name in ("interrupted", "straight"):
        runs[name] = small_run_config(
            tmp_path,
            name,
            mlflow_server,
            data={"train_url": shards, **storage},
            checkpoint={"storage_url": s3_endpoint.url("runs", name), "every_steps": 4, **storage},
            train={"steps": 10, "eval_every": 5},
        )
    checked(run_pretrain(ray_cluster, runs["interrupted"], "train.stop_after=5"))
    client, run = only_run(mlflow_server, f"{tmp_path.name}-interrupted")
    assert run.info.status == "KILLED"  # left after step 5, as if preempted
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 6))
    # No record says where a run resumed: the driver's output does.
    second = checked(run_pretrain(ray_cluster, runs["interrupted"]))
    assert "resumed from checkpoint at step 5" in second
    checked(run_pretrain(ray_cluster, runs["straight"]))

    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_endpoint.storage_options)
    weights = {}
    for name in runs:
        latest = sorted(fs.glob(f"{s3_endpoint.bucket}/runs/{name}/*/step_*"))[-1]
        assert latest.endswith("step_000000010")
        local = tmp_path / f"{name}.safetensors"
        fs.get(f"{latest}/model.safetensors", str(local))
        weights[name] = load_file(local)
    assert max_relative_difference(weights["interrupted"], weights["straight"]) <= 1e-6

    client, run = only_run(mlflow_server, f"{tmp_path.name}-interrupted")
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 11))  # one run, every step once


def _kill_one_worker_after_first_checkpoint(cluster, runs: Path, earlier: set, killed: list):
    """SIGKILL one training worker of this run (not one of the ``earlier`` workers, nor another
    cluster's on the machine) once Ray Train registered a checkpoint: a folder that is still
    being written is not one a restart can pick."""
    if not wait_until(lambda: registered_checkpoints(runs), timeout=240, interval=0.2):
        return
    workers = [pid for actor, pid in train_workers(cluster).items() if actor not in earlier]
    if workers:
        os.kill(workers[0], signal.SIGKILL)
        killed.append(workers[0])


def test_killed_worker_resumes_from_last_checkpoint_and_finishes(
    ray_cluster, mlflow_server, shapes_shards, tmp_path
):
    config = small_run_config(
        tmp_path,
        "fault",
        mlflow_server,
        data={"train_url": shapes_shards},
        train={"steps": 80, "eval_every": 1000},
        checkpoint={"every_steps": 10},
        scaling={"max_failures": 1},
    )
    killed: list[str] = []
    watcher = threading.Thread(
        target=_kill_one_worker_after_first_checkpoint,
        args=(ray_cluster, tmp_path / "runs", set(train_workers(ray_cluster)), killed),
    )
    watcher.start()
    output = checked(run_pretrain(ray_cluster, config))
    watcher.join()
    assert killed, "no training worker was found to kill"
    assert "resumed from checkpoint at step" in output
    client, run = only_run(mlflow_server, f"{tmp_path.name}-fault")
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 81))
