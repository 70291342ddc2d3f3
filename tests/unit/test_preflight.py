"""Preflight: every URL a run touches has a scheme its library serves, and what must exist
exists; ``--from`` names weights that are there. Each refusal names the key and the URL."""

from pathlib import Path

import pytest
import yaml

from pipeline import finetune, pretrain
from pipeline.config import ConfigError, load_config
from pipeline.data.sources import shapes
from pipeline.data.writer import write_shards
from pipeline.run.preflight import (
    MLFLOW_SCHEMES,
    check_storage_url,
    check_tracking_scheme,
    resolve,
)
from pipeline.run.references import Origin, resolve_reference
from pipeline.tracking import TAG_PARENT, TAG_PRETRAIN_RUN, TAG_PRETRAIN_STEP, TAG_TASK
from tests.helpers.cluster import free_port

SYNTHETIC = "synthetic://?samples=64&resolution=32&classes=10"


@pytest.mark.parametrize(
    "uri",
    ["sqlite:///m.db", "http://127.0.0.1:5000", "https://mlflow.example", "file:///tmp/mlruns",
     "/tmp/mlruns", "mlruns", "databricks"],
)  # fmt: skip
def test_tracking_uris_mlflow_serves_pass(uri):
    check_tracking_scheme(uri)


@pytest.mark.parametrize("uri", ["ftp://example/x", "s3://bucket/mlflow", "gopher://x/y"])
def test_tracking_uris_mlflow_does_not_serve_are_refused_naming_key_and_uri(uri):
    with pytest.raises(ConfigError) as error:
        check_tracking_scheme(uri)
    assert str(error.value).startswith(f"tracking.uri: {uri}: MLflow has no tracking store")


def test_the_accepted_tracking_schemes_are_those_mlflow_registers():
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    assert MLFLOW_SCHEMES <= set(_tracking_store_registry._registry)


def test_a_tracking_database_must_answer_and_its_password_is_not_shown():
    port = free_port()
    with pytest.raises(ConfigError) as error:
        check_tracking_scheme(f"postgresql+psycopg2://user:hunter2@127.0.0.1:{port}/mlflow")
    message = str(error.value)
    assert message.startswith(f"tracking.uri: 127.0.0.1:{port} does not accept connections")
    assert "hunter2" not in message


@pytest.mark.parametrize(
    "url", ["s3://bucket/runs", "file:///tmp/runs", "/tmp/runs", "runs", "simplecache::s3://b/x"]
)
def test_storage_urls_fsspec_serves_pass(url):
    check_storage_url("checkpoint.storage_url", url)


@pytest.mark.parametrize("url", ["nosuch://bucket/runs", "nosuch::s3://bucket/runs"])
def test_storage_urls_no_filesystem_serves_are_refused_naming_key_and_url(url):
    with pytest.raises(ConfigError) as error:
        check_storage_url("checkpoint.storage_url", url)
    assert str(error.value).startswith(f"checkpoint.storage_url: {url}: no filesystem serves")


def write_config(tmp_path: Path) -> Path:
    """A valid config: synthetic data, checkpoints and a SQLite store under ``tmp_path``."""
    path = tmp_path / "run.yaml"
    config = {
        "model": {"name": "nfnet_nano"},
        "data": {"train_url": SYNTHETIC},
        "train": {"global_batch": 16, "micro_batch": 8, "steps": 2},
        "checkpoint": {"storage_url": f"file://{tmp_path}/runs"},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
        "scaling": {"num_workers": 1},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_pretrain_refuses_an_ftp_tracking_uri_with_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = str(write_config(tmp_path))
    assert pretrain.main(["--config", config, "--dry-run"]) == 0  # the control
    capsys.readouterr()
    assert pretrain.main(["--config", config, "--dry-run", "tracking.uri=ftp://example/x"]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith(f"error: {config}: tracking.uri: ftp://example/x: ")
    assert not (tmp_path / "mlflow.db").exists()


def test_a_val_url_must_hold_a_validation_split(tmp_path):
    url = f"file://{tmp_path}/shapes"
    write_shards(shapes(40, 16, seed=0), url, samples_per_shard=20, val_samples=8, progress=False)
    resolve(load_config(None, [f"data.train_url={url}", f"data.val_url={url}"]))
    missing = f"file://{tmp_path}/none"
    with pytest.raises(ConfigError, match=f"^data.val_url: {missing}/_info.json: does not exist"):
        resolve(load_config(None, [f"data.train_url={url}", f"data.val_url={missing}"]))
    with pytest.raises(ConfigError, match="^data.val_url: 'pipe:cat x' is a pipe: URL"):
        resolve(load_config(None, [f"data.train_url={url}", "data.val_url=pipe:cat x"]))


def test_a_checkpoint_origin_must_hold_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as error:
        resolve_reference("./empty", uri)
    assert str(error.value) == (
        f"--from ./empty: file://{tmp_path}/empty/model.safetensors does not exist; "
        "a checkpoint is a folder holding model.safetensors"
    )
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"")
    (tmp_path / "empty" / "ema.safetensors").write_bytes(b"")
    origin = resolve_reference("./empty", uri)
    weights = {"kind": "checkpoint", "url": f"file://{tmp_path}/empty", "weights": "ema"}
    assert origin == Origin(weights, None, None)
    assert origin.kind == "finetune" and resolve_reference("scratch", uri).kind == "scratch"
    with pytest.raises(ConfigError, match="^--from x://y: x://y: no filesystem serves x://"):
        resolve_reference("x://y", uri)


def test_finetune_refuses_a_path_without_weights_with_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = str(write_config(tmp_path))
    argv = ["--config", config, "--from", "../../etc/passwd", "--dry-run"]
    assert finetune.main(argv) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: --from ../../etc/passwd: file:///")
    assert "/etc/passwd/model.safetensors does not exist" in stderr


def test_lineage_tags_of_an_origin_leave_the_kind_to_the_launch():
    run = "0123abcd" * 4
    tags = Origin({"kind": "checkpoint", "url": "s3://b/r/step_5"}, run, 5).tags("digits")
    assert tags == {TAG_TASK: "digits", TAG_PRETRAIN_RUN: run, TAG_PARENT: run,
                    TAG_PRETRAIN_STEP: "5"}  # fmt: skip
    assert Origin(None, None, None).tags("digits") == {TAG_TASK: "digits"}
