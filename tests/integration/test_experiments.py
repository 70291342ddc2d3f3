"""An experiment end to end: a shrunken ``agc_batch`` (two batch sizes, a few steps each) run by
``python -m pipeline.experiments`` on the session's Ray head, tracked by the MLflow server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.analysis import compare_runs
from pipeline.data import write_shards
from pipeline.data.sources import shapes
from tests.helpers.runs import ROOT

pytestmark = pytest.mark.integration


def run_experiment(cluster, mlflow_uri: str, out: Path) -> subprocess.CompletedProcess:
    """``python -m pipeline.experiments run agc_batch``, shrunk to two runs of 4 steps."""
    return subprocess.run(
        [
            sys.executable, "-m", "pipeline.experiments", "run", "agc_batch",
            "--out", str(out), "--tracking-uri", mlflow_uri,
            "--only", "b64-agc,b256-noagc",
            "--set", "train.steps=4", "--set", "train.log_every=2",
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
    # A small shapes set where the experiment keeps its shards: the runner writes only missing ones.
    write_shards(
        shapes(480, 32, seed=0),
        f"file://{tmp_path}/shards/shapes32",
        samples_per_shard=100,
        val_samples=64,
        progress=False,
    )
    first = run_experiment(ray_cluster, mlflow_server, tmp_path)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("agc_batch")
    assert experiment.tags["pipeline.figure"] == "batch"
    runs = {
        run.data.tags["pipeline.experiment_run"]: run
        for run in client.search_runs([experiment.experiment_id])
    }
    assert sorted(runs) == ["b256-noagc", "b64-agc"]
    expected = {"b64-agc": ("64", "0.025", "0.16"), "b256-noagc": ("256", "0.1", "None")}
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
    again = run_experiment(ray_cluster, mlflow_server, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    reread = {run.info.run_id: run for run in client.search_runs([experiment.experiment_id])}
    assert sorted(reread) == sorted(run.info.run_id for run in runs.values())
    for run in runs.values():  # not trained again: the same run, ended when it first ended
        assert reread[run.info.run_id].info.end_time == run.info.end_time

    compared = compare_runs(
        mlflow_server, experiment="agc_batch", out_dir=tmp_path / "plots", quiet=True
    )
    assert compared["plots"]["agc_batch.png"] == {"with AGC": 1, "without AGC": 1}
    assert (tmp_path / "plots" / "agc_batch.png").stat().st_size > 0
    table = (tmp_path / "plots" / "table.md").read_text()
    for row in compared["experiment_rows"]:
        top1 = runs[row["run"]].data.metrics["val/top1"]
        assert row["val_top1"] == round(top1, 5)  # the table's number is MLflow's
        assert f"| {row['run']} | nfnet_nano | 40,244 | {row['batch']} |" in table
