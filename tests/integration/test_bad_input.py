"""The bad-input catalogue: every malformed config exits 2 naming the key, and starts nothing.

Each case runs ``pipeline.pretrain.main`` in-process (imports once, ~0.1 s a case) with and
without ``--dry-run``; a few also run as real ``python -m`` subprocesses. After every case the
session's MLflow server holds no new experiment or run, Ray was not started here, and the
checkpoint folder holds nothing. Every URL a run touches is in the catalogue twice: a scheme
its library does not serve, and a place that does not exist or does not answer.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import ViewType

from pipeline import finetune, pretrain, schedule
from pipeline.data.sources import shapes
from pipeline.data.writer import write_shards
from tests.helpers.images import tar_bytes, write_info

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SYNTHETIC = "synthetic://?samples=64&resolution=32&classes=10"
DEAD = "http://127.0.0.1:1"  # port 1: nothing listens, the connection is refused at once


@dataclass(frozen=True)
class Case:
    """One malformed input: overrides (or a whole file's text) and the key the message names."""

    name: str
    overrides: tuple[str, ...] = ()
    text: str | None = None  # the config file's whole text instead of the valid base config
    names: tuple[str, ...] = ()  # substrings stderr must hold (besides the config file's path)


CASES = [
    Case("unknown key", ("model.nmae=nfnet_nano",), names=("unknown key 'model.nmae'",)),
    Case("unknown section", ("optimiser.lr=0.1",), names=("unknown key 'optimiser'",)),
    Case("wrong type", ("train.global_batch=lots",), names=("'train.global_batch'",)),
    Case("zero lr", ("optim.lr=0",), names=("'optim.lr'", "greater than 0")),
    Case("negative lr", ("optim.lr=-0.4",), names=("'optim.lr'", "greater than 0")),
    Case(
        "batch not divisible",
        ("train.global_batch=20",),
        names=("train.global_batch=20", "train.micro_batch × scaling.num_workers"),
    ),
    Case("unknown model", ("model.name=nfnet_f99",), names=("model.name", "nfnet_f99")),
    Case("zero lambda", ("optim.clipping=0",), names=("'optim.clipping'",)),
    Case("negative lambda", ("optim.clipping=-0.01",), names=("'optim.clipping'",)),
    Case("no lambda at batch 8192", ("train.global_batch=8192",), names=("optim.clipping", "8192")),
    Case("empty dataset URL", ("data.train_url=",), names=("'data.train_url'",)),
    Case("no _info.json", ("data.train_url=file://{tmp}/nodata",), names=("data.train_url",)),
    Case(
        "empty dataset",
        ("data.train_url=file://{tmp}/empty",),
        names=("data.train_url", "{tmp}/empty", "no training samples"),
    ),
    Case(
        "dead S3 endpoint for data",
        (
            "data.train_url=s3://bucket/set",
            "data.storage_options={client_kwargs: {endpoint_url: '" + DEAD + "'}}",
        ),
        names=("data.storage_options.client_kwargs.endpoint_url", DEAD),
    ),  # fmt: skip
    Case(
        "dead S3 endpoint for checkpoints",
        (
            "checkpoint.storage_url=s3://bucket/runs",
            "checkpoint.storage_options={client_kwargs: {endpoint_url: '" + DEAD + "'}}",
        ),
        names=("checkpoint.storage_options.client_kwargs.endpoint_url", DEAD),
    ),  # fmt: skip
    Case("dead MLflow server", (f"tracking.uri={DEAD}",), names=("tracking.uri", DEAD)),
    Case(
        "tracking URI MLflow does not serve",
        ("tracking.uri=ftp://example/x",),
        names=("tracking.uri", "ftp://example/x"),
    ),
    Case(
        "dead tracking database",
        ("tracking.uri=postgresql://user:pw@127.0.0.1:1/mlflow",),
        names=("tracking.uri", "127.0.0.1:1"),
    ),
    Case(
        "dataset URL no filesystem serves",
        ("data.train_url=nosuch://bucket/set",),
        names=("data.train_url", "nosuch://bucket/set"),
    ),
    Case(
        "checkpoint URL no filesystem serves",
        ("checkpoint.storage_url=nosuch://bucket/runs",),
        names=("checkpoint.storage_url", "nosuch://bucket/runs"),
    ),
    Case(
        "no validation set at val_url",
        ("data.train_url={shards}", "data.val_url=file://{tmp}/nodata"),
        names=("data.val_url", "{tmp}/nodata"),
    ),
    Case(
        "checkpoints under a regular file",
        ("checkpoint.storage_url=file:///etc/hostname/runs",),
        names=("checkpoint.storage_url", "/etc/hostname/runs"),
    ),
    Case(
        "checkpoints under /proc",
        ("checkpoint.storage_url=file:///proc/runs",),
        names=("checkpoint.storage_url", "/proc/runs"),
    ),
    Case("ZeRO 2 with AGC", ("train.zero_stage=2",), names=("train.zero_stage=2", "use_agc")),
    Case(
        "GPUs the machine lacks",
        ("scaling.use_gpu=true", "scaling.num_workers=16", "train.micro_batch=1"),
        names=("scaling.use_gpu", "16 GPUs"),
    ),
    Case("dead Ray address", ("scaling.ray_address=127.0.0.1:1",), names=("scaling.ray_address",)),
    Case("not YAML", text="model: [nfnet_nano\ntrain: {", names=("not valid YAML",)),
    Case("top-level list", text="- model\n- train\n", names=("top level must be a mapping",)),
    Case("override without '='", ("optim.lr",), names=("'optim.lr'", "section.key=value")),
    Case(
        "negative stochastic depth",
        ("model.stochdepth_rate=-0.1",),
        names=("'model.stochdepth_rate'",),
    ),  # noqa: E501
    Case("padding 'valid'", ("model.padding=valid",), names=("'model.padding'", "'valid'")),
    Case(
        "pipe: URL not allowed",
        ("data.train_url=pipe:cat /etc/hostname",),
        names=("data.train_url", "data.allow_pipe"),
    ),
]
SUBPROCESS_CASES = [
    "unknown key",
    "dead MLflow server",
    "tracking URI MLflow does not serve",
    "pipe: URL not allowed",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small valid shard set, for cases whose fault lies elsewhere."""
    url = f"file://{tmp_path_factory.mktemp('shards')}/shapes"
    write_shards(shapes(40, 16, seed=0), url, samples_per_shard=20, val_samples=8, progress=False)
    return url


@pytest.fixture
def setup(tmp_path: Path, mlflow_server: str, shards: str, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A valid base config (synthetic data, tmp checkpoints, the session MLflow server)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a bad case must not find a cluster
    (tmp_path / "nodata").mkdir()
    (tmp_path / "empty").mkdir()
    for name in ("train-000000.tar", "validation-000000.tar"):
        (tmp_path / "empty" / name).write_bytes(tar_bytes([]))
    splits = {"train": [("train-000000.tar", 0)], "validation": [("validation-000000.tar", 0)]}
    write_info(tmp_path / "empty", splits, num_classes=2)
    base = {
        "model": {"name": "nfnet_nano"},
        "data": {"train_url": SYNTHETIC},
        "train": {"global_batch": 16, "micro_batch": 8, "steps": 2},
        "checkpoint": {"storage_url": f"file://{tmp_path}/runs"},
        "tracking": {"uri": mlflow_server, "experiment": f"bad-input-{tmp_path.name}"},
        "scaling": {"num_workers": 1},
    }
    return {"tmp": tmp_path, "base": base, "uri": mlflow_server, "shards": shards}


def fill(setup: dict, text: str) -> str:
    """``text`` with ``{tmp}`` and ``{shards}`` filled in."""
    return text.replace("{tmp}", str(setup["tmp"])).replace("{shards}", setup["shards"])


def write_config(setup: dict, case: Case) -> tuple[Path, list[str]]:
    """The case's config file and its overrides, with ``{tmp}`` and ``{shards}`` filled in."""
    path = setup["tmp"] / "bad.yaml"
    path.write_text(case.text if case.text is not None else yaml.safe_dump(setup["base"]))
    return path, [fill(setup, item) for item in case.overrides]


def run_count(uri: str) -> int:
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return len(client.search_runs(experiments, run_view_type=ViewType.ALL, max_results=50000))


def assert_nothing_started(setup: dict, runs_before: int) -> None:
    """No MLflow experiment or run, no Ray in this process, nothing in checkpoint storage."""
    import ray

    client = MlflowClient(setup["uri"])
    assert client.get_experiment_by_name(setup["base"]["tracking"]["experiment"]) is None
    assert run_count(setup["uri"]) == runs_before
    assert not ray.is_initialized()
    runs = setup["tmp"] / "runs"
    assert not runs.exists() or sorted(runs.iterdir()) == []


def test_the_base_config_passes_the_dry_run(setup):
    """The control: without the fault, the same checks pass (so each case fails for its fault)."""
    path, _ = write_config(setup, Case("valid"))
    runs_before = run_count(setup["uri"])
    assert pretrain.main(["--config", str(path), "--dry-run"]) == 0
    shards = [fill(setup, "data.train_url={shards}"), fill(setup, "data.val_url={shards}")]
    assert pretrain.main(["--config", str(path), "--dry-run", *shards]) == 0
    assert_nothing_started(setup, runs_before)


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_config_exits_2_naming_the_key(setup, capsys, case: Case, dry_run: bool):
    path, overrides = write_config(setup, case)
    runs_before = run_count(setup["uri"])
    argv = ["--config", str(path), *(["--dry-run"] if dry_run else []), *overrides]
    code = pretrain.main(argv)
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert str(path) in stderr
    for expected in case.names:
        assert fill(setup, expected) in stderr, stderr
    assert "Traceback" not in stderr
    assert_nothing_started(setup, runs_before)


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_config_exits_2_as_a_real_command(setup, name: str):
    case = next(case for case in CASES if case.name == name)
    path, overrides = write_config(setup, case)
    runs_before = run_count(setup["uri"])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"DS_ACCELERATOR": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.pretrain", "--config", str(path), *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    for expected in case.names:
        assert fill(setup, expected) in result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_started(setup, runs_before)


FROM_CASES = [
    ("yesterday-best", ("--from 'yesterday-best'", "models:/NAME/VERSION")),
    ("../../etc/passwd", ("--from ../../etc/passwd", "/etc/passwd/model.safetensors")),
    ("{tmp}/nodata", ("--from {tmp}/nodata", "{tmp}/nodata/model.safetensors")),
    ("file:///proc/no/such/run", ("--from file:///proc/no/such/run", "does not exist")),
    ("0" * 32, ("--from " + "0" * 32, "no MLflow run")),
    ("models:/no-such-model/1", ("--from models:/no-such-model/1", "no such registered model")),
]


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize(("ref", "names"), FROM_CASES, ids=[ref for ref, _ in FROM_CASES])
def test_finetune_with_a_bad_from_reference_exits_2(setup, capsys, ref, names, dry_run):
    path, _ = write_config(setup, Case("valid"))
    runs_before = run_count(setup["uri"])
    argv = ["--config", str(path), "--from", fill(setup, ref), *(["--dry-run"] if dry_run else [])]
    code = finetune.main(argv)
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    for expected in names:
        assert fill(setup, expected) in stderr, stderr
    assert "Traceback" not in stderr
    assert_nothing_started(setup, runs_before)


def test_finetune_from_a_checkpoint_folder_passes_the_dry_run(setup, tmp_path):
    """The control: a folder holding the weights file is a valid origin."""
    path, _ = write_config(setup, Case("valid"))
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "model.safetensors").write_bytes(b"")
    (tmp_path / "checkpoint" / "ema.safetensors").write_bytes(b"")
    argv = ["--config", str(path), "--from", str(tmp_path / "checkpoint"), "--dry-run"]
    assert finetune.main(argv) == 0


def test_scheduler_refuses_a_job_spec_with_shell_syntax(setup, capsys):
    jobs = setup["tmp"] / "jobs"
    jobs.mkdir()
    spec = {
        "name": "digits",
        "config": "configs/finetune/digits.yaml",
        "train_url": "file://shards/digits",
        "overrides": ["optim.lr=0.1; rm -rf ~"],
    }
    (jobs / "digits.yaml").write_text(yaml.safe_dump(spec))
    code = schedule.main(["--pretrain-run", "0" * 32, "--jobs", str(jobs), "--once"])
    stderr = capsys.readouterr().err
    assert code == 2
    assert str(jobs / "digits.yaml") in stderr
    assert "'overrides'" in stderr and "optim.lr=0.1; rm -rf ~" in stderr
