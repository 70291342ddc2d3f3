"""Authentication end to end on 127.0.0.1: the session's Ray head runs Ray's token
authentication, and an MLflow server runs MLflow's basic-auth app.

A ``ray job submit`` of a short ``pipeline.pretrain`` without a token, or with a wrong one, is
refused (HTTP 401 and 403) and starts nothing (with the session's token, test_pretrain's runs).
The preflight and the scheduler name the fix when the cluster refuses them. A run logs to the
authenticating MLflow server with the credentials in its environment (the driver hands them on
to the rank-0 worker), and wrong or missing ones stop a run with exit 2 naming ``tracking.uri``
before anything starts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from ray.util.state import list_jobs

from pipeline.run.ray_cluster import (
    AUTH_MODE,
    AUTH_TOKEN,
    AUTH_TOKEN_PATH,
    auth_headers,
    check_token,
    job_client,
)
from tests.helpers.runs import ROOT

pytestmark = pytest.mark.integration

RAY = str(Path(sys.executable).parent / "ray")
WRONG_TOKEN = "0" * 64


def status_of(url: str, headers: dict[str, str], body: dict | None = None) -> int:
    """The HTTP status of a GET (or, with ``body``, a JSON POST) to ``url``."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, headers={**headers}, method="POST" if data else "GET"
    )
    if data:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def tokenless_env(cluster, home: Path, **extra: str) -> dict[str, str]:
    """The cluster's environment without the session's token: an empty home, no token variables."""
    env = cluster.env(HOME=str(home))
    for name in (AUTH_MODE, AUTH_TOKEN, AUTH_TOKEN_PATH):
        env.pop(name, None)
    return env | extra


def short_run(tmp_path: Path, name: str, tracking_uri: str | None = None) -> Path:
    """A 2-step nfnet_nano run on synthetic data, one worker, everything under ``tmp_path``."""
    config = {
        "model": {"name": "nfnet_nano"},
        "data": {"train_url": "synthetic://?samples=64&resolution=32&classes=10"},
        "train": {"global_batch": 16, "micro_batch": 8, "steps": 2, "log_every": 1,
                  "eval_every": 2},
        "checkpoint": {"storage_url": f"file://{tmp_path}/{name}-runs", "every_steps": 2},
        "tracking": {"uri": tracking_uri or f"sqlite:///{tmp_path}/{name}.db",
                     "experiment": f"{name}-{tmp_path.name}"},
        "scaling": {"num_workers": 1},
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(argv: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_the_session_head_answers_only_with_its_token(ray_cluster):
    version = f"{ray_cluster.dashboard_url}/api/version"
    assert status_of(version, {}) == 401
    assert status_of(version, {"Authorization": f"Bearer {WRONG_TOKEN}"}) == 403
    assert status_of(version, auth_headers()) == 200
    check_token(ray_cluster.address)  # the GCS takes this process's token


def test_ray_job_submit_without_the_token_or_with_a_wrong_one_is_refused_and_starts_nothing(
    ray_cluster, tmp_path
):
    config = short_run(tmp_path, "submitted")
    entrypoint = ["--", "python", "-m", "pipeline.pretrain", "--config", str(config)]

    def submit(env: dict[str, str], submission_id: str) -> subprocess.CompletedProcess:
        # RAY_ADDRESS would override --address: the job API itself, as a user's shell has it.
        return run(
            [RAY, "job", "submit", "--address", ray_cluster.dashboard_url,
             "--submission-id", submission_id, *entrypoint],
            env | {"RAY_ADDRESS": ray_cluster.dashboard_url},
        )  # fmt: skip

    missing = submit(tokenless_env(ray_cluster, tmp_path / "home"), "auth-missing-token")
    assert missing.returncode != 0
    assert "Missing authentication token" in missing.stdout + missing.stderr
    wrong = submit(
        tokenless_env(
            ray_cluster, tmp_path / "home", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="x" * 64
        ),
        "auth-wrong-token",
    )
    assert wrong.returncode != 0
    assert "Invalid authentication token" in wrong.stdout + wrong.stderr
    # The job API's answers themselves, for the same submission.
    jobs_api = f"{ray_cluster.dashboard_url}/api/jobs/"
    body = {"entrypoint": "echo hello", "submission_id": "auth-raw"}
    assert status_of(jobs_api, {}, body) == 401
    assert status_of(jobs_api, {"Authorization": f"Bearer {WRONG_TOKEN}"}, body) == 403

    client = job_client(ray_cluster.dashboard_url)
    refused = {"auth-missing-token", "auth-wrong-token", "auth-raw"}
    assert refused.isdisjoint(job.submission_id for job in client.list_jobs())
    assert not (tmp_path / "submitted-runs").exists() and not (tmp_path / "submitted.db").exists()
    # With the session's token the same submission runs: every `ray job submit` of the suite
    # (test_pretrain's runs pretrain to the end) goes to this token-authenticated head.


def test_preflight_and_scheduler_name_the_token_when_the_cluster_refuses_theirs(
    ray_cluster, tmp_path
):
    config = short_run(tmp_path, "refused")
    pretrain = [sys.executable, "-m", "pipeline.pretrain", "--config", str(config), "--dry-run"]
    home = tmp_path / "home"
    missing = run(pretrain, tokenless_env(ray_cluster, home))
    assert missing.returncode == 2, missing.stderr[-3000:]
    assert "scaling.ray_address" in missing.stderr
    assert "asks for a token and this process has none" in missing.stderr
    assert "RAY_AUTH_TOKEN" in missing.stderr and "~/.ray/auth_token" in missing.stderr
    assert not (home / ".ray").exists()  # nothing generated for a cluster we only join

    wrong = run(pretrain, tokenless_env(ray_cluster, home, RAY_AUTH_TOKEN=WRONG_TOKEN))
    assert wrong.returncode == 2, wrong.stderr[-3000:]
    assert "refused the token from RAY_AUTH_TOKEN" in wrong.stderr
    assert WRONG_TOKEN not in wrong.stderr  # the message names where the token is, not the token

    schedule = [
        sys.executable, "-m", "pipeline.schedule", "--pretrain-run", "0" * 32,
        "--jobs", "jobs/finetune", "--tracking-uri", f"sqlite:///{tmp_path}/refused.db",
        "--ray-address", ray_cluster.dashboard_url, "--once",
    ]  # fmt: skip
    scheduler = run(schedule, tokenless_env(ray_cluster, home, RAY_AUTH_TOKEN=WRONG_TOKEN))
    assert scheduler.returncode == 2, scheduler.stderr[-3000:]
    assert "--ray-address" in scheduler.stderr and "refused the token" in scheduler.stderr
    assert list((tmp_path / "refused-runs").glob("*")) == []  # the write probe only, removed


def test_a_run_logs_to_the_authenticating_server_with_the_credentials_of_its_environment(
    ray_cluster, mlflow_auth_server, tmp_path, monkeypatch
):
    server = mlflow_auth_server
    config = short_run(tmp_path, "signed-in", tracking_uri=server.uri)
    pretrain = [sys.executable, "-m", "pipeline.pretrain", "--config", str(config)]
    result = run(pretrain, ray_cluster.env(**server.credentials()))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    for name, value in server.credentials().items():
        monkeypatch.setenv(name, value)
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name(f"signed-in-{tmp_path.name}")
    (finished,) = client.search_runs([experiment.experiment_id])
    assert finished.info.status == "FINISHED"
    # The Ray workers were started without MLflow credentials: rank 0 logged with the ones the
    # driver handed on in the job's runtime environment.
    assert len(client.get_metric_history(finished.info.run_id, "train/loss")) == 2


def test_wrong_or_missing_mlflow_credentials_exit_2_naming_tracking_uri_before_anything_starts(
    ray_cluster, mlflow_auth_server, tmp_path, monkeypatch
):
    server = mlflow_auth_server
    wrong_password = "not-the-password-4242"
    config = short_run(tmp_path, "tracked", tracking_uri=server.uri)
    pretrain = [sys.executable, "-m", "pipeline.pretrain", "--config", str(config)]
    wrong = run(pretrain, ray_cluster.env(**server.credentials(wrong_password)))
    assert wrong.returncode == 2, wrong.stderr[-3000:]
    assert "tracking.uri" in wrong.stderr
    assert f"refused the credentials of user {server.username!r}" in wrong.stderr
    assert "MLFLOW_TRACKING_USERNAME" in wrong.stderr
    assert wrong_password not in wrong.stdout + wrong.stderr

    missing = run([*pretrain, "--dry-run"], ray_cluster.env())
    assert missing.returncode == 2, missing.stderr[-3000:]
    assert "tracking.uri" in missing.stderr and "asks for credentials" in missing.stderr

    # Nothing started: no experiment on the server, no run folder, no driver on Ray.
    for name, value in server.credentials().items():
        monkeypatch.setenv(name, value)
    assert MlflowClient(server.uri).get_experiment_by_name(f"tracked-{tmp_path.name}") is None
    assert list((tmp_path / "tracked-runs").glob("*")) == []
    drivers = list_jobs(address=ray_cluster.dashboard_url, limit=10000)
    assert [job for job in drivers if str(config) in (job.entrypoint or "")] == []

    # The same with the password in the URI: refused, and the password shown nowhere.
    port = server.uri.rsplit(":", 1)[1]
    in_uri = f"tracking.uri=http://{server.username}:{wrong_password}@127.0.0.1:{port}"
    for name in server.credentials():
        monkeypatch.delenv(name)
    refused = run([*pretrain, "--dry-run", in_uri], ray_cluster.env())
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"http://{server.username}:***@127.0.0.1:{port}" in refused.stderr
    assert wrong_password not in refused.stdout + refused.stderr
