"""pipeline.tracking and pipeline.compare against a real ``mlflow server`` over HTTP.

A small HTTP proxy between the client and the server counts the requests by path, can hold them
(a stalled server) and can answer the next ones with 503 (a server restarting), so the tests see
exactly what the logger sends and how it copes.
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
import yaml
from mlflow import MlflowClient

from pipeline import compare, tracking

pytestmark = pytest.mark.integration

LOG_BATCH = "/api/2.0/mlflow/runs/log-batch"
SECRET = "planted-aws-secret-0123456789"
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}


class CountingProxy(ThreadingHTTPServer):
    """Forwards every request to the MLflow server; counts, holds or fails them on demand."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = urlsplit(upstream)
        self.counts: Counter[str] = Counter()
        self.open = threading.Event()
        self.open.set()
        self.fail_next = 0
        self.lock = threading.Lock()

    @property
    def uri(self) -> str:
        """The URI clients use instead of the server's."""
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(BaseHTTPRequestHandler):
    server: CountingProxy

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = self.path.split("?", 1)[0]
        with self.server.lock:
            self.server.counts[path] += 1
            fail = self.server.fail_next > 0
            self.server.fail_next -= int(fail)
        if fail:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.server.open.wait()
        upstream = http.client.HTTPConnection(
            self.server.upstream.hostname, self.server.upstream.port, timeout=30
        )
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        payload = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        upstream.close()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def log_message(self, *args: object) -> None:
        """Quiet: pytest shows the test's own output."""


@pytest.fixture
def proxy(mlflow_server: str) -> Iterator[CountingProxy]:
    """A counting proxy in front of the session's MLflow server."""
    server = CountingProxy(mlflow_server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.open.set()
    server.shutdown()
    server.server_close()


def test_server_answers_health_check(mlflow_server: str) -> None:
    tracking.check_tracking_uri(mlflow_server)


def test_create_run_over_http_keeps_secrets_out_of_params_tags_and_artifact(
    mlflow_server: str, tmp_path: Path
) -> None:
    config = {
        "data": {"storage_options": {"key": "AKIA", "secret": SECRET}},
        "checkpoint": {"storage_options": {"client_kwargs": {"aws_session_token": SECRET}}},
        "optim": {"lr": 0.4},
    }
    tags = {"pipeline.kind": "pretrain", "api_token": SECRET}
    run_id = tracking.create_run(
        mlflow_server, "it", "secrets", config, yaml.safe_dump(config), tags
    )
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.params == {
        "data.storage_options.key": "***",
        "data.storage_options.secret": "***",
        "checkpoint.storage_options.client_kwargs.aws_session_token": "***",
        "optim.lr": "0.4",
    }
    text = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text()
    assert yaml.safe_load(text)["data"]["storage_options"] == {"key": "***", "secret": "***"}
    assert SECRET not in " ".join([*run.data.tags.values(), *run.data.params.values(), text])


def test_logger_queues_1000_metrics_while_the_server_stalls_and_sends_them_in_one_request(
    proxy: CountingProxy, mlflow_server: str
) -> None:
    run_id = tracking.create_run(mlflow_server, "it", "async", {}, "{}\n")
    logger = tracking.RunLogger(proxy.uri, run_id, flush_interval=60.0)
    proxy.open.clear()  # every request now hangs until the test lets it through

    def train_loop() -> None:
        for step in range(1000):
            logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)

    trainer = threading.Thread(target=train_loop)
    trainer.start()
    trainer.join(timeout=30.0)
    assert not trainer.is_alive(), "log_metrics waited on the stalled server"
    proxy.open.set()
    assert logger.close(timeout=60.0)

    assert proxy.counts[LOG_BATCH] == 1
    assert (logger.sent_metrics, logger.failed_metrics) == (1000, 0)
    history = MlflowClient(mlflow_server).get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1000))
    assert {m.step: m.value for m in history}[499] == 1.0 / 500


def test_logger_retries_a_restarting_server_until_the_batch_lands(
    proxy: CountingProxy, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # only the logger's retries
    run_id = tracking.create_run(mlflow_server, "it", "retry", {}, "{}\n")
    logger = tracking.RunLogger(proxy.uri, run_id, flush_interval=60.0, retries=4, backoff=0.01)
    proxy.fail_next = 2
    for step in range(50):
        logger.log_metrics({"train/loss": float(step), "train/lr": 0.1}, step=step)
    assert logger.close(timeout=60.0)
    assert proxy.counts[LOG_BATCH] == 3  # two answered 503, the third landed
    assert (logger.sent_metrics, logger.failed_metrics) == (100, 0)
    client = MlflowClient(mlflow_server)
    assert len(client.get_metric_history(run_id, "train/lr")) == 50


def test_registry_and_checkpoint_lineage_over_http(mlflow_server: str) -> None:
    run_id = tracking.create_run(mlflow_server, "it", "registry", {}, "{}\n")
    state = {"head.weight": torch.ones(2, 3), "head.bias": torch.zeros(2)}
    tracking.log_safetensors_weights(mlflow_server, run_id, state)
    versions = [
        tracking.register_model(mlflow_server, run_id, "weights/model.safetensors", "nfnet-it")
        for _ in range(2)
    ]
    assert versions == [1, 2]
    for step in (100, 200):
        tracking.log_checkpoint_event(mlflow_server, run_id, step, f"s3://ckpt/run/{step}")
    assert tracking.list_checkpoints(mlflow_server, run_id) == [
        (100, "s3://ckpt/run/100"),
        (200, "s3://ckpt/run/200"),
    ]
    tracking.end_run(mlflow_server, run_id)
    assert MlflowClient(mlflow_server).get_run(run_id).info.status == "FINISHED"


def test_compare_over_http_plots_the_logged_points(mlflow_server: str, tmp_path: Path) -> None:
    pretrain = tracking.create_run(
        mlflow_server, "it-compare", "pre", {}, "{}\n", tracking.lineage_tags("pretrain")
    )
    with tracking.RunLogger(mlflow_server, pretrain) as logger:
        for step in range(30):
            logger.log_metrics({"train/loss": 2.0 - step / 30}, step=step)
            if step % 10 == 9:
                logger.log_metrics({"val/top1": step / 40}, step=step)
    for step, top1 in ((10, 0.6), (20, 0.7)):
        tags = tracking.lineage_tags("finetune", "digits", pretrain, step)
        run_id = tracking.create_run(mlflow_server, "it-finetune", None, {}, "{}\n", tags)
        with tracking.RunLogger(mlflow_server, run_id) as logger:
            logger.log_metrics({"val/top1": top1}, step=5)
    result = compare.compare_runs(mlflow_server, [pretrain], out_dir=tmp_path, quiet=True)
    assert result["plots"] == {
        "loss.png": {"pre train/loss": 30},
        "top1.png": {"pre val/top1": 3},
        "downstream.png": {"digits": 2},
        "finetune_vs_scratch.png": {"finetuned": 1},
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(result["plots"])
    assert compare.main(["0" * 32, "--tracking-uri", mlflow_server]) == 2
