"""Scheduled finetuning with real components: a pretraining run on the session's Ray head (token
authentication on), the scheduler submitting finetune Ray jobs per checkpoint milestone with the
session's token, MLflow over HTTP, compare."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from pipeline.analysis import compare_runs
from pipeline.data.sources import digits, shapes
from pipeline.data.writer import write_shards
from pipeline.run.ray_cluster import RAY_JOB_ENDED, job_client, job_state
from tests.helpers.cluster import wait_until
from tests.helpers.runs import ROOT, checked, run_pretrain, small_run_config

pytestmark = pytest.mark.integration


def schedule(cluster, mlflow_uri: str, run_id: str, jobs: Path, *extra: str):
    """``python -m pipeline.schedule`` as its own process (each call is a fresh scheduler)."""
    return subprocess.run(
        [
            sys.executable, "-m", "pipeline.schedule",
            "--pretrain-run", run_id, "--jobs", str(jobs),
            "--every", "5", "--max-running", "2", "--retries", "1", "--poll", "2",
            "--tracking-uri", mlflow_uri, "--ray-address", cluster.dashboard_url,
            *extra,
        ],
        env=cluster.env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip


def wait_until_settled(client, run_id: str, timeout: float = 300) -> list:
    """The scheduler's jobs for this run, once none is pending or running."""
    jobs: list = []

    def settled() -> bool:
        jobs[:] = [
            j for j in client.list_jobs() if (j.metadata or {}).get("pretrain_run") == run_id
        ]
        return bool(jobs) and all(job_state(j.status) in RAY_JOB_ENDED for j in jobs)

    assert wait_until(settled, timeout, interval=2), "finetune jobs did not settle in time"
    return jobs


def refuses_anonymous_requests(dashboard_url: str) -> bool:
    """Whether the job server answers 401 to a request without a token."""
    try:
        urllib.request.urlopen(f"{dashboard_url}/api/jobs/", timeout=10).close()
    except urllib.error.HTTPError as error:
        return error.code == 401
    return False


def test_scheduler_finetunes_each_milestone_once_retries_and_compare_plots(
    ray_cluster, mlflow_server, tmp_path
):
    assert refuses_anonymous_requests(ray_cluster.dashboard_url)  # what the scheduler submits to
    shards = f"file://{tmp_path}/shapes"
    write_shards(
        shapes(320, 32, seed=2), shards, samples_per_shard=100, val_samples=64, progress=False
    )
    config = small_run_config(
        tmp_path, "pretrain", mlflow_server, data={"train_url": shards}, train={"steps": 10}
    )
    checked(run_pretrain(ray_cluster, config))
    mlflow = MlflowClient(mlflow_server)
    experiment = mlflow.get_experiment_by_name(f"{tmp_path.name}-pretrain")
    (pretrain_run,) = mlflow.search_runs([experiment.experiment_id])
    run_id = pretrain_run.info.run_id

    # The task's shards do not exist yet: every first attempt fails (exit 2, bad input).
    task_url = f"file://{tmp_path}/digits"
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "digits.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "digits",
                "config": "configs/finetune/digits.yaml",
                "train_url": task_url,
                "num_cpus": 0.5,
                "overrides": [
                    "train.steps=4",
                    "train.global_batch=16",
                    "train.micro_batch=16",
                    "train.eval_every=2",
                    "train.log_every=1",
                    "scaling.num_workers=1",
                    f"checkpoint.storage_url=file://{tmp_path}/finetune-runs",
                ],
            }
        )
    )
    first = schedule(ray_cluster, mlflow_server, run_id, jobs, "--once")
    assert first.returncode == 0, first.stderr
    ray_jobs = job_client(ray_cluster.dashboard_url)
    settled = wait_until_settled(ray_jobs, run_id)
    assert sorted(j.metadata["step"] for j in settled) == ["10", "5"]
    assert {job_state(j.status) for j in settled} == {"FAILED"}

    write_shards(digits(32), task_url, samples_per_shard=500, progress=False)
    final = schedule(ray_cluster, mlflow_server, run_id, jobs)  # runs until all is done
    assert final.returncode == 0, final.stdout + final.stderr
    again = schedule(ray_cluster, mlflow_server, run_id, jobs, "--once")  # a restarted scheduler
    assert again.returncode == 0

    # The scheduler may end once MLflow shows the finetune runs finished, while their Ray jobs
    # are still exiting: let them settle before reading their final statuses.
    submitted = wait_until_settled(ray_jobs, run_id)
    attempts = sorted((j.metadata["step"], j.metadata["attempt"]) for j in submitted)
    assert attempts == [("10", "0"), ("10", "1"), ("5", "0"), ("5", "1")]  # nothing twice
    by_attempt = {(j.metadata["step"], j.metadata["attempt"]): j for j in submitted}
    assert job_state(by_attempt[("5", "1")].status) == "SUCCEEDED"
    assert job_state(by_attempt[("10", "1")].status) == "SUCCEEDED"

    finetunes = mlflow.search_runs(
        [experiment.experiment_id], f"tags.`pipeline.pretrain_run_id` = '{run_id}'"
    )
    assert sorted(int(r.data.tags["pipeline.pretrain_step"]) for r in finetunes) == [5, 10]
    for run in finetunes:
        assert run.info.status == "FINISHED"
        assert run.data.tags["pipeline.kind"] == "finetune"
        assert run.data.tags["pipeline.task"] == "digits"
        assert run.data.tags["mlflow.parentRunId"] == run_id
        assert run.data.params["model.name"] == "nfnet_nano"

    plotted = compare_runs(
        mlflow_server, experiment=experiment.name, out_dir=tmp_path / "plots", quiet=True
    )
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 0
    assert (tmp_path / "plots" / "downstream.png").stat().st_size > 0
    for run in [pretrain_run, *finetunes]:
        logged = len(mlflow.get_metric_history(run.info.run_id, "train/loss"))
        points = plotted["plots"]["loss.png"][f"{run.info.run_name} train/loss"]
        assert points == logged > 0
    assert sum(plotted["plots"]["downstream.png"].values()) == 2  # two milestones, one task
