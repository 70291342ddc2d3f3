"""``python -m pipeline.compare --same-as``: two real MLflow stores (SQLite), run for run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from pipeline import compare
from pipeline.analysis.reproduce import compare_stores, is_timing


def store(tmp_path: Path, name: str, losses: list[float], images_per_s: float) -> str:
    """A store with one experiment and one run ``pretrain-x`` logging ``losses`` at steps 1..n."""
    uri = f"sqlite:///{tmp_path / name}.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("demo")
    run = client.create_run(experiment, run_name="pretrain-x").info.run_id
    metrics = [Metric("train/loss", v, 0, s) for s, v in enumerate(losses, start=1)]
    metrics += [Metric("train/images_per_s", images_per_s, 0, 1), Metric("val/top1", 0.5, 0, 2)]
    client.log_batch(run, metrics=metrics)
    client.set_terminated(run)
    return uri


def test_a_rerun_with_the_same_metrics_is_identical_whatever_its_speed(tmp_path, caplog):
    first = store(tmp_path, "a", [2.0, 1.5, math.nan], images_per_s=100.0)
    second = store(tmp_path, "b", [2.0, 1.5, math.nan], images_per_s=250.0)
    result = compare_stores(first, second)
    assert result.identical and (result.runs, result.points) == (1, 4)  # 3 losses, 1 top-1
    caplog.set_level("INFO")
    assert compare.main(["--tracking-uri", first, "--same-as", second]) == 0
    assert "identical: 1 runs matched by name, 4 metric points compared" in caplog.text


def test_a_rerun_that_moved_is_named_with_its_largest_difference(tmp_path, caplog):
    first = store(tmp_path, "a", [2.0, 1.5, 1.25], images_per_s=100.0)
    second = store(tmp_path, "b", [2.0, 1.5, 1.0], images_per_s=100.0)
    result = compare_stores(first, second)
    (difference,) = result.differences
    assert (difference.run, difference.key, difference.max_abs) == (
        "demo/pretrain-x",
        "train/loss",
        0.25,
    )
    assert difference.note == "1 of 3 points differ"
    short = store(tmp_path, "c", [2.0, 1.5], images_per_s=100.0)
    (steps,) = compare_stores(first, short).differences
    assert steps.max_abs == math.inf and steps.note == "steps differ: 3 against 2 points"
    caplog.set_level("INFO")
    assert compare.main(["--tracking-uri", first, "--same-as", second]) == 1
    assert "DIFFERENT" in caplog.text and "train/loss: max |difference| 0.25" in caplog.text


def test_a_missing_store_exits_2_naming_it(tmp_path, capsys):
    first = store(tmp_path, "a", [2.0], images_per_s=1.0)
    absent = f"sqlite:///{tmp_path / 'absent.db'}"
    assert compare.main(["--tracking-uri", first, "--same-as", absent]) == 2
    assert "absent.db" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("key", "timing"),
    [
        ("train/images_per_s_per_worker", True),
        ("train/mfu", True),
        ("checkpoint/upload_seconds", True),
        ("train/data_wait_fraction", True),
        ("train/agc_clip_fraction", False),
        ("val/top1_ema", False),
        ("train/steps_lost", False),
    ],
)
def test_only_metrics_that_time_the_machine_are_left_out(key, timing):
    assert is_timing(key) is timing


def test_runs_of_other_folders_match_without_their_config_hash(tmp_path):
    first = store(tmp_path, "a", [2.0, 1.5], images_per_s=1.0)
    second = store(tmp_path, "b", [2.0, 1.5], images_per_s=1.0)
    for uri, name in ((first, "b256-agc-0123abcd"), (second, "b256-agc-4567ef01")):
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
        client.set_tag(run.info.run_id, "mlflow.runName", name)
        if uri == second:  # a newer version of the pipeline logs one metric more
            client.log_metric(run.info.run_id, "train/world_size", 1.0, step=1)
    result = compare_stores(first, second, experiment="demo")
    assert result.identical and (result.runs, result.points) == (1, 3)
    assert result.one_sided == ["demo/b256-agc: train/world_size"]


def test_a_rerun_finetune_is_matched_by_its_lineage_not_its_name(tmp_path):
    stores = []
    for name, pretrain_id, finetune in (("a", "1" * 32, "finetune-x-0123abcd"),
                                        ("b", "2" * 32, "finetune-x-89abcdef")):  # fmt: skip
        uri = store(tmp_path, name, [2.0, 1.5], images_per_s=1.0)
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("demo").experiment_id
        run = client.create_run(experiment, run_name=finetune).info.run_id
        for tag, value in (("pipeline.kind", "finetune"), ("pipeline.task", "digits"),
                           ("pipeline.pretrain_step", "500"),
                           ("pipeline.pretrain_run_id", pretrain_id)):  # fmt: skip
            client.set_tag(run, tag, value)
        client.log_param(run, "train.seed", "1")
        client.log_metric(run, "val/top1", 0.75, step=150)
        stores.append(uri)
    result = compare_stores(*stores)
    assert result.identical and (result.runs, result.points) == (2, 4)
