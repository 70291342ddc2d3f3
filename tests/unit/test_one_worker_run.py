"""What a run pays and prints beyond training: no gradient all-reduce for a single worker, each
worker line printed once, and Ray started only for a run that will train."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE

from pipeline import logs
from pipeline.bench.gpu import local_trainer, single_process_group
from pipeline.config import load_config
from pipeline.run import launch
from pipeline.run.ray_cluster import RAY_TRAIN_ENV
from pipeline.tracking import end_run
from pipeline.train.plan import make_plan


def _weights_after_two_steps(all_reduce: bool) -> dict[str, torch.Tensor]:
    config = load_config(
        None,
        [
            "model.name=nfnet_nano",
            "data.train_url=synthetic://?samples=64&classes=10&resolution=32",
            "data.train_resolution=32",
            "train.global_batch=16",
            "train.micro_batch=8",  # 2 accumulation slots: the boundary comes every other one
            "train.steps=2",
            "train.time_allreduce=true",
            "optim.clipping=0.01",
        ],
    )
    trainer = local_trainer(config)
    assert trainer.engine.enable_backward_allreduce is False  # one worker: nothing to average
    trainer.engine.enable_backward_allreduce = all_reduce
    batch = next(trainer.batches.steps(0))
    steps = itertools.repeat(batch)
    for _ in range(2):
        trainer.run_step(steps)
    assert (trainer.stats.allreduce_time > 0) == all_reduce
    return {name: value.detach().clone() for name, value in trainer.model.state_dict().items()}


def test_one_worker_skips_the_all_reduce_and_trains_the_same_weights():
    with single_process_group(torch.device("cpu")):
        skipped = _weights_after_two_steps(all_reduce=False)
        reduced = _weights_after_two_steps(all_reduce=True)
    assert skipped.keys() == reduced.keys()
    for name in skipped:
        torch.testing.assert_close(skipped[name], reduced[name], rtol=0, atol=0, msg=name)


def test_a_worker_logs_each_line_to_stdout_once(capsys):
    """Ray Train's workers print the root logger's records too: a worker's pipeline records
    stay off the root logger, so the driver gets each line once."""
    seen: list[str] = []
    root_console = logging.Handler()
    root_console.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger().addHandler(root_console)
    try:
        logs.configure(propagate=False)
        logging.getLogger("pipeline.train.trainer").info("step 1/2  loss 2.3")
        assert capsys.readouterr().out == "step 1/2  loss 2.3\n"
        assert seen == []
        logs.configure()  # a command's own process: records reach the root (pytest's caplog)
        logging.getLogger("pipeline.train.trainer").info("step 2/2  loss 2.2")
        assert seen == ["step 2/2  loss 2.2"]
    finally:
        logging.getLogger().removeHandler(root_console)
        logs.configure()


def test_ray_train_hands_our_settings_on_to_its_workers():
    # Set in the driver's environment, they reach the workers only through this list.
    assert set(RAY_TRAIN_ENV) <= ENV_VARS_TO_PROPAGATE


@pytest.fixture
def opened(tmp_path, monkeypatch):
    """``open_run_and_connect`` on a fresh MLflow store, with Ray's start recorded, not run."""
    started: list[str | None] = []
    monkeypatch.setattr(launch, "connect_ray", started.append)
    config = load_config(
        None,
        [
            "model.name=nfnet_nano",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"checkpoint.storage_url=file://{tmp_path}/runs",
        ],
    )
    plan = make_plan(config, num_classes=10, train_samples=64, val_samples=16)

    def open_run() -> tuple[str, str | None]:
        return launch.open_run_and_connect(config, plan, "run", {})

    return config, open_run, started


def test_ray_starts_for_a_new_or_resumed_run_but_not_for_a_finished_one(opened):
    config, open_run, started = opened
    run_id, previous = open_run()
    assert previous is None and started == [None]  # new: Ray starts beside MLflow's run
    assert open_run() == (run_id, "RUNNING")  # resumed, as after a lost driver
    assert started == [None, None]
    end_run(config.tracking.uri, run_id, status="FINISHED")
    assert open_run() == (run_id, "FINISHED")
    assert started == [None, None]  # nothing left to train: no cluster
