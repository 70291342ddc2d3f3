"""Step boundaries (checkpoint, stop, hold), lost steps, and the checkpoint upload job: Ray Train's
own storage class on a local folder, a real SQLite MLflow store."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from pipeline.config import RunConfig
from pipeline.data.storage import StorageError
from pipeline.models import create_model
from pipeline.optim import SGD_AGC, ModelEma, param_groups
from pipeline.tracking import create_run
from pipeline.train import checkpoint as ckpt
from pipeline.train.preemption import (
    STEPS_LOST,
    StepBoundary,
    agreed_notice,
    deadline_of,
    local_notice,
    record_steps_lost,
    steps_lost,
)


def boundary(**checkpoint) -> StepBoundary:
    config = RunConfig.model_validate(
        {"checkpoint": {"every_steps": 4, "preemption_check_every": 0, **checkpoint},
         "train": {"stop_after": 6}}
    )  # fmt: skip
    return StepBoundary(config, total_steps=10, first_step=0, run_id=None)


def test_checkpoints_come_on_schedule_at_stop_after_and_at_the_last_step():
    at = boundary()
    decisions = {step: at.after(step) for step in range(1, 11)}
    assert [s for s, d in decisions.items() if d.save] == [4, 6, 8, 10]
    # The step waits for the upload where nothing would go on: a stop, the last step.
    assert [s for s, d in decisions.items() if d.wait] == [6, 10]
    assert [s for s, d in decisions.items() if d.stop] == [6]
    assert all(d.notice is None for d in decisions.values())


def test_a_boundary_without_a_notice_holds_nothing():
    at = boundary()
    tick = time.monotonic()
    at.hold(at.after(3), 3)
    assert time.monotonic() - tick < 0.1


def test_steps_lost_is_the_last_logged_step_minus_the_resumed_one():
    assert steps_lost({"train/loss": 17, "checkpoint_step": 15}, 15) == 2
    assert steps_lost({"train/loss": 15}, 15) == 0
    assert steps_lost({}, 0) == 0


def test_the_deadline_is_the_drains_or_ray_trains_fallback():
    assert deadline_of(SimpleNamespace(deadline_ms=12_000), now=5.0) == 12.0
    # Ray Train's controller waits 120 s for a drain without a deadline.
    assert deadline_of(SimpleNamespace(deadline_ms=None), now=5.0) == 125.0


def test_lost_steps_add_up_over_restarts_in_the_same_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = create_run(uri, "lost", "run", {}, "config: {}\n")
    assert record_steps_lost(uri, run_id, 0) is None  # a first start: nothing logged before
    client = MlflowClient(uri)
    for step in range(1, 8):
        client.log_metric(run_id, "train/loss", 1.0, step=step)
    assert record_steps_lost(uri, run_id, 5) == 2  # trained to 7, resumed from 5
    for step in range(6, 10):
        client.log_metric(run_id, "train/loss", 1.0, step=step)
    assert record_steps_lost(uri, run_id, 5) == 6  # again from 5, after reaching 9: 4 more
    history = client.get_metric_history(run_id, STEPS_LOST)
    assert sorted((m.step, m.value) for m in history) == [(5, 2.0), (5, 6.0)]
    assert client.get_run(run_id).data.metrics[STEPS_LOST] == 6.0


@pytest.fixture
def storage(tmp_path):
    """Ray Train's own StorageContext on a local folder."""
    from ray.train.v2._internal.execution.storage import StorageContext

    return StorageContext(str(tmp_path / "store"), "run")


def staged_checkpoint() -> str:
    model = create_model("nfnet_nano", num_classes=4)
    optimizer = SGD_AGC(param_groups(model, 2e-5, 0.01), lr=0.1)
    return ckpt.stage(model, optimizer, ModelEma(model), {"step": 3})


def test_the_milestone_comes_only_after_the_checkpoint_is_stored(storage, tmp_path):
    import ray.train

    staged = staged_checkpoint()
    stored_at_milestone = []
    folder = Path(storage.build_checkpoint_path_from_name("step_000000003"))
    upload = ckpt.Upload(3)

    def milestone() -> None:
        stored_at_milestone.extend(sorted(p.name for p in folder.iterdir()))

    checkpoint = ray.train.Checkpoint.from_directory(staged)
    url = f"file://{tmp_path}/store/run/step_000000003"
    ckpt.upload_job(
        upload, lambda: ckpt.persist(storage, checkpoint, "step_000000003", url), None, milestone
    )
    assert upload.wait(timeout=0) and upload.seconds > 0
    assert stored_at_milestone == sorted(
        ["ema.safetensors", "model.safetensors", "optimizer.safetensors", "state.json"]
    )


def test_a_failed_upload_reaches_its_waiters_and_logs_no_milestone():
    upload = ckpt.Upload(5)
    milestones = []

    def unreachable():
        raise StorageError("checkpoint.storage_url s3://b/run/step_000000005", "refused")

    with pytest.raises(StorageError):
        ckpt.upload_job(upload, unreachable, None, lambda: milestones.append(5))
    assert milestones == []
    with pytest.raises(StorageError, match="s3://b/run/step_000000005"):
        upload.wait(timeout=0)


def test_an_upload_not_yet_finished_does_not_block_a_bounded_wait():
    assert ckpt.Upload(1).wait(timeout=0.01) is False


def test_a_nonfinite_checkpoint_leaves_no_staged_folder(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    model = create_model("nfnet_nano", num_classes=4)
    optimizer = SGD_AGC(param_groups(model, 2e-5, 0.01), lr=0.1)
    ema = ModelEma(model)
    next(model.parameters()).data[0] = float("nan")
    with pytest.raises(ckpt.NonfiniteCheckpointError):
        ckpt.stage(model, optimizer, ema, {"step": 1})
    assert list(tmp_path.iterdir()) == []


def test_outside_ray_train_there_is_no_notice_and_one_process_keeps_its_own():
    assert local_notice() is None
    notice = SimpleNamespace(deadline_ms=12_000)
    assert agreed_notice(notice) is notice and agreed_notice(None) is None


def _agree(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # Only rank 1 (the drained node's) was told; both must act, with its deadline.
        mine = SimpleNamespace(deadline_ms=1_796_000_000_000) if rank == 1 else None
        agreed = agreed_notice(mine)
        results[rank] = (agreed is not None, getattr(agreed, "deadline_ms", None))
        results[rank + 2] = agreed_notice(None) is None  # nobody told: nobody acts
    finally:
        dist.destroy_process_group()


def test_a_notice_one_rank_received_reaches_every_rank_with_its_deadline():
    import torch.multiprocessing as mp

    from tests.helpers.cluster import free_port

    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(_agree, args=(free_port(), results), nprocs=2)
    assert results[0] == results[1] == (True, 1_796_000_000_000)
    assert results[2] and results[3]
