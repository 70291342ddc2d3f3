"""Run identity: the same command names the same run, so running it again resumes it; where Ray
Train writes; the local Ray cluster's environment and its stopping."""

import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.config import load_config
from pipeline.run.launch import RAY_S3_RETRIES, default_run_name, storage_target
from pipeline.run.ray_cluster import (
    RAY_JOB_ENDED,
    RAY_JOB_FAILED,
    RAY_JOB_SUCCEEDED,
    job_state,
    local_ray_env,
    stop_ray_processes,
)


def test_same_command_same_run_name_whatever_stop_after_or_uri_spelling():
    base = load_config(None, ["model.name=nfnet_nano"])
    stopped = load_config(None, ["model.name=nfnet_nano", "train.stop_after=5"])
    other_uri = load_config(None, ["model.name=nfnet_nano", "tracking.uri=sqlite:////abs/x.db"])
    name = default_run_name(base, "pretrain")
    assert name.startswith("pretrain-nfnet_nano-")
    assert default_run_name(stopped, "pretrain") == name
    assert default_run_name(other_uri, "pretrain") == name
    assert default_run_name(base, "pretrain", {"tags": None, "init": None}) == name


def test_another_worker_or_loader_count_is_the_same_run():
    # The data and the parameters do not depend on them (pipeline.data.streams): a resume on
    # another worker count continues the same run.
    batch = ["model.name=nfnet_nano", "train.global_batch=8", "train.micro_batch=4"]
    base = load_config(None, batch)
    name = default_run_name(base, "pretrain")
    for changed in (["scaling.num_workers=2"], ["data.loader_workers=0"]):
        config = load_config(None, [*batch, *changed])
        assert default_run_name(config, "pretrain") == name


def test_a_different_recipe_or_origin_is_a_different_run():
    base = load_config(None, ["model.name=nfnet_nano"])
    name = default_run_name(base, "pretrain")
    assert default_run_name(load_config(None, ["optim.lr=0.3"]), "pretrain") != name
    finetunes = {
        default_run_name(base, "finetune", {"init": {"kind": "checkpoint", "url": f"s/{step}"}})
        for step in (100, 200)
    }
    assert len(finetunes) == 2 and name not in finetunes
    assert default_run_name(load_config(None, ["tracking.run_name=mine"]), "x") == "mine"


def test_storage_targets():
    path, filesystem = storage_target("file:///tmp/runs", {})
    assert (path, filesystem) == ("/tmp/runs", None)
    path, filesystem = storage_target("s3://bucket/runs", {"anon": True})
    assert path == "bucket/runs" and filesystem is not None
    assert storage_target("s3://bucket/runs", {}) == ("s3://bucket/runs", None)
    # Ray Train's own writes (its checkpoint snapshot) ride out outages with botocore's retries.
    assert filesystem.handler.fs.config_kwargs["retries"] == RAY_S3_RETRIES
    own = {"anon": True, "config_kwargs": {"retries": {"max_attempts": 1}, "read_timeout": 5}}
    _, filesystem = storage_target("s3://bucket/runs", own)
    assert filesystem.handler.fs.config_kwargs == own["config_kwargs"]


def test_stop_ray_processes_signals_only_the_marked_processes_and_their_children(tmp_path):
    import psutil

    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    # The marked process (the mark: a temp dir) starts an unmarked child, as a raylet its agents.
    parent = "import subprocess, sys, time; subprocess.Popen(sys.argv[1:2]); time.sleep(60)"
    marked = subprocess.Popen([sys.executable, "-c", parent, sys.executable, str(tmp_path)])
    other = subprocess.Popen(sleeper)
    cmdline = Path(f"/proc/{marked.pid}/cmdline")
    while str(tmp_path).encode() not in cmdline.read_bytes():  # until python has been exec'd
        time.sleep(0.01)
    while not psutil.Process(marked.pid).children():
        time.sleep(0.01)
    (child,) = psutil.Process(marked.pid).children()
    try:
        assert stop_ray_processes([str(tmp_path)]) == 2
        assert marked.wait(timeout=10) == -signal.SIGTERM
        child.wait(timeout=10)  # raises TimeoutExpired while it lives
        assert not child.is_running()
        assert other.poll() is None
    finally:
        marked.kill()
        other.kill()
        other.wait()


def test_the_local_ray_environment_runs_this_python_on_the_cpu_with_token_auth(monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin")
    env = local_ray_env(EXTRA="1")
    assert env["PATH"] == f"{Path(sys.executable).parent}:/usr/bin"
    assert (env["DS_ACCELERATOR"], env["RAY_USAGE_STATS_ENABLED"]) == ("cpu", "0")
    assert env["RAY_AUTH_MODE"] == "token" and env["EXTRA"] == "1"


def test_job_states_by_outcome():
    from ray.job_submission import JobStatus

    assert RAY_JOB_ENDED == RAY_JOB_SUCCEEDED | RAY_JOB_FAILED
    assert {job_state(status) for status in JobStatus if status.is_terminal()} == RAY_JOB_ENDED
    assert job_state("JobStatus.RUNNING") == "RUNNING"
