"""``python -m pipeline.compare`` on runs logged to a real MLflow SQLite store."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from pipeline import analysis, compare, tracking
from pipeline.analysis.report import format_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TASKS = ("digits", "shapes")
CHECKPOINT_STEPS = (10, 20)


def _log(uri: str, run_id: str, key: str, values: list[tuple[int, float]]) -> None:
    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, step) for step, value in values]
    MlflowClient(uri).log_batch(run_id, metrics=metrics)


def _pretrain(uri: str, name: str, lr: float, loss_points: int, eval_points: int) -> str:
    params = {"optim": {"lr": lr, "use_agc": True}, "model": {"name": "nfnet_test"}}
    run_id = tracking.create_run(
        uri, "pretrain", name, params, "{}\n", tags=tracking.lineage_tags("pretrain")
    )
    _log(uri, run_id, "train/loss", [(s, 3.0 - 0.1 * s) for s in range(loss_points)])
    _log(uri, run_id, "train/images_per_s", [(s, 100.0 + s) for s in range(loss_points)])
    _log(uri, run_id, "val/top1", [(5 * s, 0.1 * s) for s in range(eval_points)])
    _log(uri, run_id, "val/top1_ema", [(5 * s, 0.09 * s) for s in range(eval_points)])
    tracking.end_run(uri, run_id)
    return run_id


def _downstream(uri: str, kind: str, task: str, top1: float, **lineage: object) -> str:
    tags = tracking.lineage_tags(kind, task, **lineage)
    run_id = tracking.create_run(uri, "finetune", f"{kind}-{task}", {}, "{}\n", tags=tags)
    _log(uri, run_id, "val/top1", [(0, top1 / 2), (1, top1)])
    tracking.end_run(uri, run_id)
    return run_id


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two pretraining runs; the first finetuned on two tasks at two checkpoints, plus scratch."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    first = _pretrain(uri, "agc", lr=0.4, loss_points=20, eval_points=4)
    second = _pretrain(uri, "no-agc", lr=0.2, loss_points=12, eval_points=3)
    for index, task in enumerate(TASKS):
        for step in CHECKPOINT_STEPS:
            top1 = 0.5 + index * 0.1 + step / 100
            _downstream(uri, "finetune", task, top1, pretrain_run_id=first, pretrain_step=step)
        _downstream(uri, "scratch", task, 0.3 + index * 0.1)
    return {"uri": uri, "first": first, "second": second}


def test_compare_plots_every_logged_point_of_every_series(
    logged: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "plots"
    result = analysis.compare_runs(logged["uri"], [logged["first"], logged["second"]], out_dir=out)

    assert result["plots"] == {
        "loss.png": {"agc train/loss": 20, "no-agc train/loss": 12},
        "top1.png": {
            "agc val/top1": 4,
            "agc val/top1_ema": 4,
            "no-agc val/top1": 3,
            "no-agc val/top1_ema": 3,
        },
        "downstream.png": {"digits": 2, "shapes": 2, "digits scratch": 1, "shapes scratch": 1},
        "finetune_vs_scratch.png": {"finetuned": 2, "scratch": 2},
    }
    assert result["skipped"] == {}
    for name in result["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in out.iterdir()) == sorted(result["plots"])  # no temp files left


def test_compare_table_has_final_and_best_values_and_differing_params(
    logged: dict[str, str], tmp_path: Path
) -> None:
    result = analysis.compare_runs(
        logged["uri"], [logged["first"], logged["second"]], out_dir=tmp_path
    )
    first, second = result["runs"]
    assert (first["run"], first["kind"], first["status"]) == ("agc", "pretrain", "FINISHED")
    assert first["train/loss final"] == pytest.approx(3.0 - 0.1 * 19)
    assert first["train/loss best"] == pytest.approx(3.0 - 0.1 * 19)
    assert second["val/top1 final"] == pytest.approx(0.2)
    assert second["train/images_per_s best"] == 111.0
    assert result["differing_params"] == {"optim.lr": {"agc": "0.4", "no-agc": "0.2"}}
    report = format_report(result["runs"], result["differing_params"])
    assert "optim.lr" in report and "1.1/1.1" in report


def test_downstream_groups_the_final_top1_by_pretraining_step(logged: dict[str, str]) -> None:
    comparison = analysis.Comparison(logged["uri"])
    views = comparison.search(comparison.all_experiment_ids(), "")
    finetuned, scratch = analysis.group_downstream(comparison, views)
    assert finetuned == {
        (logged["first"], "digits"): {10: pytest.approx(0.6), 20: pytest.approx(0.7)},
        (logged["first"], "shapes"): {10: pytest.approx(0.7), 20: pytest.approx(0.8)},
    }
    assert scratch == {"digits": pytest.approx(0.3), "shapes": pytest.approx(0.4)}


def test_compare_by_experiment_skips_plots_without_data(
    logged: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "loss.png").write_bytes(PNG_MAGIC)  # left over from an earlier comparison
    result = analysis.compare_runs(
        logged["uri"], experiment="finetune", out_dir=tmp_path, quiet=True
    )
    assert len(result["runs"]) == 6
    assert result["skipped"] == {"loss.png": "no run logged train/loss"}
    top1 = result["plots"]["top1.png"]
    assert (len(top1), sum(top1.values())) == (6, 12)  # 6 runs × 2 logged val/top1 points
    assert result["plots"]["downstream.png"]["digits"] == 2
    assert not (tmp_path / "loss.png").exists()


def test_comparing_one_finetune_run_finds_its_scratch_baseline(
    logged: dict[str, str], tmp_path: Path
) -> None:
    comparison = analysis.Comparison(logged["uri"])
    finetune_filter = "tags.`pipeline.task` = 'digits' and tags.`pipeline.pretrain_step` = '20'"
    (finetune,) = comparison.search(comparison.all_experiment_ids(), finetune_filter)
    result = analysis.compare_runs(logged["uri"], [finetune.run_id], out_dir=tmp_path, quiet=True)
    assert result["plots"]["downstream.png"] == {"digits": 1, "digits scratch": 1}
    assert result["plots"]["finetune_vs_scratch.png"] == {"finetuned": 1, "scratch": 1}


def test_unknown_run_experiment_or_database_exits_2(
    logged: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = logged["uri"]
    missing_run = "0123456789abcdef0123456789abcdef"
    assert compare.main([logged["first"], missing_run, "--tracking-uri", uri]) == 2
    assert missing_run in capsys.readouterr().err
    assert compare.main(["--experiment", "no-such-exp", "--tracking-uri", uri]) == 2
    assert "no-such-exp" in capsys.readouterr().err
    absent_db = f"sqlite:///{tmp_path / 'absent.db'}"
    assert compare.main([logged["first"], "--tracking-uri", absent_db]) == 2
    assert "absent.db" in capsys.readouterr().err
    assert not (tmp_path / "absent.db").exists()
    assert compare.main(["--tracking-uri", uri]) == 2
    assert "run ids or an experiment" in capsys.readouterr().err


def test_main_writes_plots_and_exits_0(logged: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "cli"
    assert compare.main([logged["second"], "--out", str(out), "--tracking-uri", logged["uri"]]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["loss.png", "top1.png"]


def test_compare_experiment_draws_the_experiment_figure_and_table(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = (
        ("agc", "nfnet_test", 0.01, 0, 0.6),
        ("agc-seed1", "nfnet_test", 0.01, 1, 0.4),
        ("plain", "nfnet_test", None, 0, 0.5),
        ("bn", "resnet_bn_nano", None, 0, 0.7),
    )
    for name, model, clipping, seed, top1 in runs:
        params = {"model": {"name": model}, "train": {"global_batch": 64, "seed": seed}}
        params["plan"] = {"clipping": clipping, "peak_lr": 0.1}
        tags = {**tracking.lineage_tags("pretrain"), tracking.TAG_EXPERIMENT_RUN: name}
        run_id = tracking.create_run(uri, "agc_batch", name, params, "{}\n", tags=tags)
        _log(uri, run_id, "val/top1", [(0, top1 / 2), (1, top1)])
        _log(uri, run_id, "train/grad_norm", [(1, top1 * 10)])
        tracking.end_run(uri, run_id)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("agc_batch").experiment_id
    client.set_experiment_tag(experiment, tracking.TAG_FIGURE, "batch")

    result = analysis.compare_experiment(uri, "agc_batch", tmp_path / "plots")

    # Two seeds of the clipped NFNet are one point of its series; the BN ResNet is a series.
    plots = result["plots"]
    assert plots["agc_batch.png"] == {"NFNet, AGC": 2, "NFNet, no AGC": 1, "BN ResNet": 1}
    # At the largest batch, the gradient norms of the NFNet runs only (no train/loss logged).
    assert plots["agc_batch_curves.png"] == {
        "agc train/grad_norm": 1,
        "agc-seed1 train/grad_norm": 1,
        "plain train/grad_norm": 1,
    }
    rows = {row["run"]: row for row in result["experiment_rows"]}
    assert (rows["agc"]["clipping"], rows["plain"]["clipping"]) == (0.01, None)
    assert (rows["agc"]["val_top1"], rows["agc"]["batch"]) == (0.6, 64)
    assert (rows["agc-seed1"]["seed"], rows["bn"]["family"], rows["agc"]["family"]) == (
        1,
        "resnet_bn",
        "nfnet",
    )
    table = (tmp_path / "plots" / "table.md").read_text()
    assert "| agc | nfnet_test | 0 | 64 | 0.1 | 0.01 | 0 | - | 0.6 |" in table
    for name in ("agc_batch.png", "agc_batch_curves.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == PNG_MAGIC
