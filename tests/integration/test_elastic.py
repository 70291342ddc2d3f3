"""Elastic resume through the real pipeline: a run checkpointed on 2 Ray Train workers resumes
on 1 worker accumulating twice as many micro-batches, and ends with the parameters of a run that
never stopped (shards on disk, DeepSpeed with gloo, MLflow over HTTP)."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from pipeline import pretrain
from pipeline.data.sources import shapes
from pipeline.data.writer import write_shards
from tests.helpers.runs import (
    checked,
    max_relative_difference,
    only_run,
    run_pretrain,
    small_run_config,
)

pytestmark = pytest.mark.integration


def weights_at(tmp_path: Path, run_name: str, step: int) -> dict:
    """The raw weights of ``run_name``'s checkpoint of ``step``."""
    return load_file(tmp_path / "runs" / run_name / f"step_{step:09d}" / "model.safetensors")


def test_run_resumed_on_fewer_workers_equals_the_uninterrupted_run(
    ray_cluster, mlflow_server, tmp_path, capsys
):
    shards = f"file://{tmp_path}/shards"
    write_shards(
        shapes(320, 32, seed=2), shards, samples_per_shard=40, val_samples=32, progress=False
    )
    sections = {
        # DM's recipe: MixUp on half of each micro-batch, CutMix on the other, then RandAugment.
        "data": {
            "train_url": shards,
            "mixup_alpha": 0.2,
            "cutmix": True,
            "randaugment_layers": 2,
            "randaugment_magnitude": 9,
        },
        "optim": {"clipping": 0.01, "lr": 0.4},  # AGC clips units at every step
        "train": {"steps": 10, "eval_every": 100},
    }
    configs = {
        name: small_run_config(
            tmp_path, name, mlflow_server, tracking={"run_name": name}, **sections
        )
        for name in ("straight", "elastic")
    }
    checked(run_pretrain(ray_cluster, configs["straight"]))  # 2 workers x 1 micro-batch of 8
    checked(run_pretrain(ray_cluster, configs["elastic"], "train.stop_after=5"))

    # 3 workers cannot share a global batch of 16 in micro-batches of 8: refused before starting.
    assert pretrain.main(["--config", str(configs["elastic"]), "scaling.num_workers=3"]) == 2
    refused = capsys.readouterr().err
    for key in ("train.global_batch", "train.micro_batch", "scaling.num_workers"):
        assert key in refused
    # Another global batch under the same run name would change the lr and AGC's λ: refused.
    changed = ["scaling.num_workers=1", "train.global_batch=8"]
    assert pretrain.main(["--config", str(configs["elastic"]), *changed]) == 2
    assert "train.global_batch=16 (this run: 8)" in capsys.readouterr().err

    # 1 worker accumulating 2 micro-batches, with 2 loader processes: the same micro-batches.
    resumed = checked(
        run_pretrain(
            ray_cluster, configs["elastic"], "scaling.num_workers=1", "data.loader_workers=2"
        )
    )
    assert (
        "resumed from checkpoint at step 5 on 1 workers x 2 micro-batches each (written on 2 x 1)"
    ) in resumed

    for step in (5, 10):
        difference = max_relative_difference(
            weights_at(tmp_path, "elastic", step), weights_at(tmp_path, "straight", step)
        )
        assert difference <= 1e-5, (step, difference)
    client, run = only_run(mlflow_server, f"{tmp_path.name}-elastic")
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 11))  # one MLflow run, every step once
    clipped = client.get_metric_history(run.info.run_id, "train/agc_clip_fraction")
    assert len(clipped) == 10 and min(m.value for m in clipped) > 0
