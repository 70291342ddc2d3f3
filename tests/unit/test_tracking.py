"""pipeline.tracking against a real MLflow SQLite store in a temporary folder."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient
from safetensors.torch import load_file

from pipeline import tracking
from tests.helpers.flaky import Flaky

SECRETS = ("AKIA-PLANTED-KEY", "planted-secret-value", "planted-session-token", "planted-pw")

CONFIG = {
    "model": {"name": "nfnet_f0", "num_classes": None},
    "data": {
        "train_url": f"s3://alice:{SECRETS[3]}@minio:9000/shards",
        "storage_options": {
            "key": SECRETS[0],
            "secret": SECRETS[1],
            "client_kwargs": {"aws_session_token": SECRETS[2], "region_name": "eu-west-1"},
        },
        "randaugment_layers": [2, 3],
    },
    "optim": {"lr": 0.4, "use_agc": True},
    "checkpoint": {"storage_options": {}},
}


@pytest.fixture(scope="module")
def uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store per module: creating MLflow's tables costs ~1 s."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_redact_replaces_secret_named_values_recursively_and_url_passwords() -> None:
    redacted = tracking.redact(CONFIG)
    assert redacted["data"]["storage_options"] == {
        "key": "***",
        "secret": "***",
        "client_kwargs": {"aws_session_token": "***", "region_name": "eu-west-1"},
    }
    assert redacted["data"]["train_url"] == "s3://alice:***@minio:9000/shards"
    assert redacted["optim"] == {"lr": 0.4, "use_agc": True}
    assert tracking.redact({"AWS_SECRET_ACCESS_KEY": "x", "Password": None}) == {
        "AWS_SECRET_ACCESS_KEY": "***",
        "Password": None,
    }
    assert CONFIG["data"]["storage_options"]["key"] == SECRETS[0]  # the input is not modified


def test_redact_hides_credentials_in_presigned_url_queries() -> None:
    url = "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA1&X-Amz-Signature=ab12&partNumber=2"
    assert tracking.redact({"url": url}) == {
        "url": "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&partNumber=2"
    }
    assert tracking.redact("https://acct.blob.core.windows.net/c?sv=2024&sig=zz") == (
        "https://acct.blob.core.windows.net/c?sv=2024&sig=***"
    )
    assert tracking.redact("file:///data/a@b/shards") == "file:///data/a@b/shards"


def test_flatten_params_gives_dotted_string_params_within_mlflow_limits() -> None:
    flat = tracking.flatten_params({**CONFIG, "long": {"text": "x" * 7000}})
    assert flat == {
        "model.name": "nfnet_f0",
        "model.num_classes": "None",
        "data.train_url": "s3://alice:***@minio:9000/shards",
        "data.storage_options.key": "***",
        "data.storage_options.secret": "***",
        "data.storage_options.client_kwargs.aws_session_token": "***",
        "data.storage_options.client_kwargs.region_name": "eu-west-1",
        "data.randaugment_layers": "[2, 3]",
        "optim.lr": "0.4",
        "optim.use_agc": "True",
        "checkpoint.storage_options": "{}",
        "long.text": "x" * 5997 + "...",
    }
    assert len(flat["long.text"]) == tracking.MAX_PARAM_VALUE_CHARS


def test_create_run_logs_redacted_params_tags_and_config_artifact(uri: str, tmp_path: Path) -> None:
    tags = {"pipeline.kind": "pretrain", "hf_token": SECRETS[2]}
    run_id = tracking.create_run(uri, "unit", "r1", CONFIG, yaml.safe_dump(CONFIG), tags=tags)

    assert mlflow.active_run() is None
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.params == tracking.flatten_params(CONFIG)
    assert run.data.tags["pipeline.kind"] == "pretrain"
    assert run.data.tags["hf_token"] == "***"
    artifact = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path)))
    text = artifact.read_text()
    assert yaml.safe_load(text) == tracking.redact(CONFIG)
    logged = " ".join([*run.data.params.values(), *run.data.tags.values(), text])
    assert [secret for secret in SECRETS if secret in logged] == []


def test_create_run_logs_params_beyond_one_batch_of_100(uri: str) -> None:
    params = {"sweep": {f"p{i:03d}": i for i in range(250)}}
    run_id = tracking.create_run(uri, "unit", None, params, "sweep: {}\n")
    logged = MlflowClient(uri).get_run(run_id).data.params
    assert len(logged) == 250
    assert logged["sweep.p249"] == "249"


def test_create_run_puts_sqlite_artifacts_next_to_the_database(uri: str) -> None:
    run_id = tracking.create_run(uri, "unit-artifacts", None, {}, "{}\n")
    db_dir = Path(uri.removeprefix("sqlite:///")).parent
    assert (
        db_dir / "mlartifacts" / "unit-artifacts" / run_id / "artifacts" / "config.yaml"
    ).is_file()


def test_end_run_sets_the_final_status(uri: str) -> None:
    finished = tracking.create_run(uri, "unit", None, {}, "{}\n")
    failed = tracking.create_run(uri, "unit", None, {}, "{}\n")
    tracking.end_run(uri, finished)
    tracking.end_run(uri, failed, status="FAILED")
    client = MlflowClient(uri)
    assert client.get_run(finished).info.status == "FINISHED"
    assert client.get_run(failed).info.status == "FAILED"
    with pytest.raises(ValueError, match="DONE"):
        tracking.end_run(uri, finished, status="DONE")


def test_weights_round_trip_and_register_model_versions_1_then_2(uri: str, tmp_path: Path) -> None:
    run_id = tracking.create_run(uri, "unit", None, {}, "{}\n")
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    # A tied weight (same storage twice) must still be saved.
    state = {"stem.weight": weight, "head.weight": weight, "head.bias": torch.zeros(3)}
    source = tracking.log_safetensors_weights(uri, run_id, state)
    assert source == f"runs:/{run_id}/weights/model.safetensors"

    local = MlflowClient(uri).download_artifacts(run_id, "weights/model.safetensors", str(tmp_path))
    loaded = load_file(local)
    assert sorted(loaded) == ["head.bias", "head.weight", "stem.weight"]
    assert torch.equal(loaded["head.weight"], weight) and torch.equal(loaded["stem.weight"], weight)

    first = tracking.register_model(uri, run_id, "weights/model.safetensors", "nfnet-unit")
    second = tracking.register_model(uri, run_id, "weights/model.safetensors", "nfnet-unit")
    assert (first, second) == (1, 2)
    version = MlflowClient(uri, registry_uri=uri).get_model_version("nfnet-unit", "2")
    assert version.run_id == run_id
    assert version.source == source


def test_list_checkpoints_returns_the_logged_events_in_step_order(uri: str) -> None:
    run_id = tracking.create_run(uri, "unit", None, {}, "{}\n")
    assert tracking.list_checkpoints(uri, run_id) == []
    for step in (200, 100, 300):
        tracking.log_checkpoint_event(uri, run_id, step, f"file:///ckpt/run/step_{step:06d}")
    assert tracking.list_checkpoints(uri, run_id) == [
        (100, "file:///ckpt/run/step_000100"),
        (200, "file:///ckpt/run/step_000200"),
        (300, "file:///ckpt/run/step_000300"),
    ]
    history = MlflowClient(uri).get_metric_history(run_id, tracking.CHECKPOINT_METRIC)
    assert sorted((m.step, m.value) for m in history) == [(100, 100.0), (200, 200.0), (300, 300.0)]


def test_run_logger_sends_everything_on_flush(uri: str) -> None:
    run_id = tracking.create_run(uri, "unit", None, {}, "{}\n")
    with tracking.RunLogger(uri, run_id, flush_interval=60.0, max_batch=100) as logger:
        for step in range(250):
            logger.log_metrics({"train/loss": 1.0 / (step + 1), "train/lr": 0.1}, step=step)
        assert logger.flush(timeout=60.0)
        assert (logger.sent_metrics, logger.failed_metrics) == (500, 0)
    history = MlflowClient(uri).get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(250))
    assert {m.step: m.value for m in history}[3] == 0.25


def test_resumed_logger_drops_steps_already_logged(uri: str) -> None:
    run_id = tracking.create_run(uri, "unit", None, {}, "{}\n")
    with tracking.RunLogger(uri, run_id) as first:
        for step in range(10):
            first.log_metrics({"train/loss": float(step)}, step=step)
        first.log_metrics({"val/top1": 0.5}, step=5)
    logged = tracking.last_logged_steps(uri, run_id)
    assert logged == {"train/loss": 9, "val/top1": 5}
    # A restart from a checkpoint at step 4 replays steps 5..9: they must not be logged twice.
    with tracking.RunLogger(uri, run_id, resume_from_step=logged) as resumed:
        for step in range(5, 15):
            resumed.log_metrics({"train/loss": float(step)}, step=step)
            if step == 10:
                resumed.log_metrics({"val/top1": 0.75}, step=step)
    assert resumed.dropped_resumed == 5
    client = MlflowClient(uri)
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(
        range(15)
    )
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/top1")) == [5, 10]


def test_run_logger_survives_an_unreachable_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # our own retries only
    uri = f"http://127.0.0.1:{_closed_port()}"
    logger = tracking.RunLogger(uri, "0" * 32, flush_interval=0.01, retries=2, backoff=0.01)
    for step in range(30):
        logger.log_metrics({"train/loss": 1.0}, step=step)
    assert logger.close(timeout=60.0)
    assert (logger.sent_metrics, logger.failed_metrics) == (0, 30)
    assert logger.last_error is not None


def test_run_logger_skips_non_numbers_and_renames_keys_mlflow_rejects(uri: str) -> None:
    run_id = tracking.create_run(uri, "unit", None, {}, "{}\n")
    with tracking.RunLogger(uri, run_id) as logger:
        metrics = {"train/loss": "nan-ish", "train/lr": torch.tensor(0.5), "top1@ema": 0.25}
        logger.log_metrics(metrics, step=0)
    assert logger.failed_metrics == 0
    assert MlflowClient(uri).get_run(run_id).data.metrics == {"train/lr": 0.5, "top1_ema": 0.25}


def test_check_tracking_uri_names_the_unusable_uri(tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(tracking.TrackingError, match=down.replace(".", r"\.")):
        tracking.check_tracking_uri(down, timeout=2.0)
    missing = f"sqlite:///{tmp_path / 'nope' / 'mlflow.db'}"
    with pytest.raises(tracking.TrackingError, match="nope"):
        tracking.check_tracking_uri(missing)
    tracking.check_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_resolve_tracking_uri_makes_sqlite_paths_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking.resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert tracking.resolve_tracking_uri("http://h:5000") == "http://h:5000"


def test_lineage_tags_of_a_finetune_run() -> None:
    assert tracking.lineage_tags("finetune", "digits", "abc123", 400) == {
        "pipeline.kind": "finetune",
        "pipeline.task": "digits",
        "pipeline.pretrain_run_id": "abc123",
        "mlflow.parentRunId": "abc123",
        "pipeline.pretrain_step": "400",
    }
    with pytest.raises(ValueError, match="teacher"):
        tracking.lineage_tags("teacher")


@pytest.mark.parametrize("end", ["", "from pipeline.cli import finish; finish(0)"])
def test_logger_left_open_still_sends_its_queue_when_the_process_exits(uri: str, end: str):
    """At a plain exit, and at the commands' fast one (``cli.finish``)."""
    run_id = tracking.create_run(uri, "unit", None, {}, "{}\n")
    script = (
        "from pipeline.tracking import RunLogger\n"
        f"logger = RunLogger({uri!r}, {run_id!r}, flush_interval=600.0)\n"
        "for step in range(7):\n"
        "    logger.log_metrics({'train/loss': float(step)}, step=step)\n"
        f"{end}\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    history = MlflowClient(uri).get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(7))


def test_mlflow_calls_retry_transient_failures_but_not_refused_requests() -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

    from pipeline.tracking.client import call_mlflow

    flaky = Flaky(ConnectionError("reset"), MlflowException("busy", TEMPORARILY_UNAVAILABLE))
    assert call_mlflow(flaky, "log_batch", retries=2, backoff=0.0) == "done"
    assert flaky.calls == 3
    refused = Flaky(MlflowException("no such run", RESOURCE_DOES_NOT_EXIST))
    with pytest.raises(MlflowException, match="no such run"):
        call_mlflow(refused, "log_batch", retries=5, backoff=0.0)
    assert refused.calls == 1
