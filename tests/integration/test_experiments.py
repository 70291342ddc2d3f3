"""Experiments end to end on the session's Ray head, tracked by the MLflow server: a shrunken
``agc_batch`` (two runs of a few steps, resumed, drawn), and the smallest run of every other
shipped experiment trained for 2 steps by ``python -m pipeline.experiments``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.analysis import compare_runs
from pipeline.data.sources import digits, shapes
from pipeline.data.writer import write_shards
from pipeline.run.experiments import load_experiment, run_configs
from tests.helpers.runs import ROOT

pytestmark = pytest.mark.integration


def write_small_datasets(name: str, out: Path, batch: int) -> None:
    """Each dataset of experiment ``name`` where the runner looks for it, with just enough
    images for one global batch of ``batch`` (the runner writes only missing shards)."""
    _, spec = load_experiment(name)
    samples = max(480, batch + batch // 8)
    for dataset in spec.datasets.values():
        source = (
            shapes(samples, dataset.resolution, seed=0)
            if dataset.source == "shapes"
            else digits(dataset.resolution, samples)
        )
        url = dataset.url.replace("{out}", str(out))
        write_shards(source, url, samples_per_shard=500, val_samples=64, progress=False)


def smallest_run(name: str) -> tuple[str, int]:
    """The experiment's pretraining run with the smallest global batch, and that batch."""
    _, spec = load_experiment(name)
    configs = run_configs(name, spec, Path("/unused"), "sqlite:///unused.db", [])
    batches = {r.name: configs[r.name].train.global_batch for r in spec.runs if not r.parent}
    run = min(batches, key=batches.__getitem__)
    return run, batches[run]


def run_experiment(
    cluster, mlflow_uri: str, out: Path, name: str, runs: str, steps: int
) -> subprocess.CompletedProcess:
    """``python -m pipeline.experiments run NAME``, shrunk to ``runs`` of ``steps`` steps."""
    return subprocess.run(
        [
            sys.executable, "-m", "pipeline.experiments", "run", name,
            "--out", str(out), "--tracking-uri", mlflow_uri,
            "--only", runs,
            "--set", f"train.steps={steps}", "--set", "train.log_every=2",
        ],
        env=cluster.env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )  # fmt: skip


def test_shrunken_agc_batch_runs_into_mlflow_resumes_and_draws_its_figure(
    ray_cluster, mlflow_server, tmp_path
):
    write_small_datasets("agc_batch", tmp_path, 256)
    shrunk = (ray_cluster, mlflow_server, tmp_path, "agc_batch", "b256-agc,b256-noagc", 4)
    first = run_experiment(*shrunk)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("agc_batch")
    assert experiment.tags["pipeline.figure"] == "batch"
    runs = {
        run.data.tags["pipeline.experiment_run"]: run
        for run in client.search_runs([experiment.experiment_id])
    }
    assert sorted(runs) == ["b256-agc", "b256-noagc"]
    expected = {"b256-agc": ("256", "0.1", "0.04"), "b256-noagc": ("256", "0.1", "None")}
    for name, (batch, lr, clipping) in expected.items():
        run = runs[name]
        assert run.info.status == "FINISHED"
        assert run.data.tags["pipeline.kind"] == "pretrain"
        assert run.data.tags["pipeline.model_params"] == "40244"  # nfnet_nano at 10 classes
        assert float(run.data.tags["pipeline.load_at_end"]) >= 0  # wall times need the load
        params = run.data.params
        assert (params["train.global_batch"], params["plan.peak_lr"]) == (batch, lr)
        assert params["plan.clipping"] == clipping  # λ by batch with AGC; None without
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4]
        assert 0.0 <= run.data.metrics["val/top1"] <= 1.0

    # Run again: both runs finished, so nothing is trained and no MLflow run is added.
    again = run_experiment(*shrunk)
    assert again.returncode == 0, again.stderr[-3000:]
    reread = {run.info.run_id: run for run in client.search_runs([experiment.experiment_id])}
    assert sorted(reread) == sorted(run.info.run_id for run in runs.values())
    for run in runs.values():  # not trained again: the same run, ended when it first ended
        assert reread[run.info.run_id].info.end_time == run.info.end_time

    compared = compare_runs(
        mlflow_server, experiment="agc_batch", out_dir=tmp_path / "plots", quiet=True
    )
    assert compared["plots"]["agc_batch.png"] == {"NFNet, AGC": 1, "NFNet, no AGC": 1}
    assert set(compared["plots"]["agc_batch_curves.png"]) == {
        f"{run} train/{key}" for run in runs for key in ("loss", "grad_norm")
    }
    for figure in ("agc_batch.png", "agc_batch_curves.png"):
        assert (tmp_path / "plots" / figure).stat().st_size > 0
    table = (tmp_path / "plots" / "table.md").read_text()
    for row in compared["experiment_rows"]:
        top1 = runs[row["run"]].data.metrics["val/top1"]
        assert row["val_top1"] == round(top1, 5)  # the table's number is MLflow's
        assert f"| {row['run']} | nfnet_nano | 40,244 | {row['batch']} |" in table


@pytest.mark.parametrize("name", ["agc_lambda", "nf_vs_bn", "transfer"])
def test_the_smallest_run_of_each_other_experiment_trains_two_steps(
    name, ray_cluster, mlflow_server, tmp_path
):
    run, batch = smallest_run(name)
    write_small_datasets(name, tmp_path, batch)
    result = run_experiment(ray_cluster, mlflow_server, tmp_path, name, run, 2)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(name)
    (trained,) = client.search_runs([experiment.experiment_id])
    assert trained.data.tags["pipeline.experiment_run"] == run
    assert trained.info.status == "FINISHED"
    assert trained.data.params["train.global_batch"] == str(batch)
    history = client.get_metric_history(trained.info.run_id, "train/loss")
    assert [m.step for m in history] == [2]
    assert 0.0 <= trained.data.metrics["val/top1"] <= 1.0
