"""The NaN/Inf policy below the trainer: the stop rule, the flags read in one go, the averages
and the EMA that leave a skipped step out, the checkpoint refusal, the fault injection of the
synthetic data source (the integration test drives them through a real run)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.models import create_model
from pipeline.optim import SGD_AGC, ModelEma, param_groups
from pipeline.train import checkpoint as ckpt
from pipeline.train.batches import SyntheticBatches, describe_dataset
from pipeline.train.metrics import StepStats
from pipeline.train.nonfinite import NonfiniteStepError, NonfiniteSteps
from pipeline.train.plan import make_plan


def test_skip_counts_every_skipped_step_and_resets_the_run_after_a_good_one():
    steps = NonfiniteSteps("skip", max_in_a_row=3)
    for step, skipped in enumerate([False, True, True, False, True, False], start=1):
        steps.record(step, skipped)
    assert (steps.total, steps.in_a_row) == (3, 0)


def test_skip_stops_after_max_in_a_row_naming_the_key_and_the_step():
    steps = NonfiniteSteps("skip", max_in_a_row=2)
    steps.record(7, skipped=True)
    with pytest.raises(NonfiniteStepError, match=r"step 8: 2 steps in a row") as error:
        steps.record(8, skipped=True)
    assert "train.max_nonfinite_in_a_row=2" in str(error.value)
    assert steps.total == 2


def test_stop_ends_the_run_at_the_first_nonfinite_step():
    steps = NonfiniteSteps("stop", max_in_a_row=10)
    steps.record(1, skipped=False)
    with pytest.raises(NonfiniteStepError, match=r"step 2: .*train\.nonfinite=stop"):
        steps.record(2, skipped=True)


def test_config_keys_and_their_defaults():
    train = load_config(None).train
    assert (train.nonfinite, train.max_nonfinite_in_a_row) == ("skip", 10)
    with pytest.raises(ConfigError, match="train.nonfinite"):
        load_config(None, ["train.nonfinite=ignore"])
    with pytest.raises(ConfigError, match="train.max_nonfinite_in_a_row"):
        load_config(None, ["train.max_nonfinite_in_a_row=0"])


def nano_state():
    torch.manual_seed(0)
    model = create_model("nfnet_nano", num_classes=10)
    optimizer = SGD_AGC(param_groups(model, 2e-5, 0.01), lr=0.1)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    optimizer.step()
    return model, optimizer, ModelEma(model, decay=0.9)


@pytest.mark.parametrize("where", ["model", "optimizer", "ema"])
def test_a_checkpoint_holding_nan_is_refused_before_any_file_is_written(where, tmp_path):
    model, optimizer, ema = nano_state()
    target = {
        "model": model.head.fc.bias,
        "optimizer": optimizer.state[model.head.fc.bias]["momentum_buffer"],
        "ema": ema.module.head.fc.bias,
    }[where]
    with torch.no_grad():
        target[2] = math.inf
    with pytest.raises(ckpt.NonfiniteCheckpointError, match="step 40: .*'head.fc.bias"):
        ckpt.save(str(tmp_path), model, optimizer, ema, {"step": 40})
    assert list(tmp_path.iterdir()) == []


def test_a_finite_checkpoint_round_trips(tmp_path):
    model, optimizer, ema = nano_state()
    ckpt.save(str(tmp_path), model, optimizer, ema, {"step": 40})
    other, other_optimizer, other_ema = nano_state()
    assert ckpt.load(str(tmp_path), other, other_optimizer, other_ema) == {"step": 40}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ema.safetensors",
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]


def test_synthetic_nonfinite_steps_poison_one_sample_on_the_last_worker():
    url = "synthetic://?samples=64&resolution=8&classes=4&nonfinite_steps=2,4"
    shape = describe_dataset(url)
    config = load_config(
        None,
        ["model.name=nfnet_nano", "train.global_batch=16", "train.micro_batch=4"]
        + ["scaling.num_workers=2", f"data.train_url={url}"],
    )
    plan = make_plan(config, shape.num_classes, shape.train_samples, shape.val_samples)
    assert plan.accumulation_steps == 2
    nan_samples = {}  # (step, rank, micro-batch) -> count of NaN samples
    for rank in range(2):
        steps = SyntheticBatches(url, plan, rank).steps(0)
        for step in range(1, 6):
            for slot, (images, _) in enumerate(next(steps)):
                count = int(torch.isnan(images).flatten(1).all(1).sum())
                if count:
                    nan_samples[step, rank, slot] = count
                    assert torch.isnan(images[-1]).all()
    assert nan_samples == {(2, 1, 1): 1, (4, 1, 1): 1}
    # A resumed source (starting at step 3) poisons the same step.
    resumed = SyntheticBatches(url, plan, 1).steps(3)
    assert torch.isnan(next(resumed)[-1][0][-1]).all()


def test_bad_nonfinite_steps_parameter_is_named():
    with pytest.raises(ValueError, match="nonfinite_steps='x'"):
        describe_dataset("synthetic://?nonfinite_steps=x")


def test_flags_stay_on_the_device_until_read_then_count_in_step_order():
    steps = NonfiniteSteps("skip", max_in_a_row=3)
    for step, flag in enumerate([False, True, True, False], start=1):
        steps.add(step, torch.tensor(flag))
    assert (steps.total, len(steps.pending)) == (0, 4)  # nothing counted before the read
    read = steps.read()
    assert read == [(1, False), (2, True), (3, True), (4, False)]
    assert steps.pending == [] and steps.read() == []
    for step, skipped in read:
        steps.record(step, skipped)
    assert (steps.total, steps.in_a_row) == (2, 0)


def test_the_stop_names_the_step_that_was_skipped_not_the_step_it_was_read_at():
    steps = NonfiniteSteps("stop", max_in_a_row=10)
    for step, flag in ((5, False), (6, True), (7, False)):
        steps.add(step, torch.tensor(flag))
    with pytest.raises(NonfiniteStepError, match=r"^step 6: ") as error:
        for step, skipped in steps.read():
            steps.record(step, skipped)
    assert error.value.step == 6


def test_step_stats_leave_skipped_steps_out_of_the_averages_but_not_the_throughput():
    stats = StepStats()
    agc = {"clip_fraction": torch.tensor(0.25), "grad_norm": torch.tensor(2.0)}
    nan = {"clip_fraction": torch.tensor(0.5), "grad_norm": torch.tensor(math.nan)}
    # Two micro-batches of 4 samples per step; the middle step is skipped (a NaN loss).
    stats.add_step(
        [torch.tensor(1.0), torch.tensor(3.0)],
        [torch.tensor(1), torch.tensor(2)],
        8,
        agc,
        torch.tensor(False),
    )
    stats.add_step(
        [torch.tensor(math.nan), torch.tensor(2.0)],
        [torch.tensor(4), torch.tensor(4)],
        8,
        nan,
        torch.tensor(True),
    )
    stats.add_step(
        [torch.tensor(5.0), torch.tensor(7.0)],
        [torch.tensor(3), torch.tensor(4)],
        8,
        agc,
        torch.tensor(False),
    )
    stats.step_time = 2.0
    metrics = stats.summary(workers=2)
    assert metrics["train/loss"] == 4.0  # (1 + 3 + 5 + 7) / 4
    assert metrics["train/top1"] == 10 / 16
    assert metrics["train/agc_clip_fraction"] == 0.25 and metrics["train/grad_norm"] == 2.0
    assert metrics["train/images_per_s"] == 24 * 2 / 2.0  # the skipped step's images count
    stats = StepStats()
    stats.add_step([torch.tensor(math.nan)], [torch.tensor(1)], 4, nan, torch.tensor(True))
    metrics = stats.summary(workers=1)
    assert math.isnan(metrics["train/loss"]) and math.isnan(metrics["train/top1"])
    assert "train/grad_norm" not in metrics and "train/agc_clip_fraction" not in metrics


def test_the_ema_moves_as_before_on_a_kept_step_and_not_at_all_on_a_skipped_one():
    model, _, ema = nano_state()
    reference = ModelEma(model, decay=0.9)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    ema.update(model, step=50, skipped=torch.tensor(True))
    for key, value in ema.module.state_dict().items():
        assert torch.equal(value, before[key]), key
    ema.update(model, step=50, skipped=torch.tensor(False))
    reference.update(model, step=50)  # the unmasked update: the same bits
    for (key, value), other in zip(
        ema.module.state_dict().items(), reference.module.state_dict().values(), strict=True
    ):
        assert torch.equal(value, other), key
    assert not torch.equal(ema.module.head.fc.bias, before["head.fc.bias"])
