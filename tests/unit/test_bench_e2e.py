"""``python -m pipeline.bench e2e``: its timing arithmetic, timm's command, and its smoke mode
(two real runs of nfnet_nano without Ray; the full comparison takes tens of minutes)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pipeline.bench import e2e
from pipeline.config import load_config
from pipeline.train.plan import make_plan


def test_step_lines_are_read_as_each_side_counts_its_steps():
    ours = e2e.Side(e2e.OURS, ("python",))
    timm = e2e.Side(e2e.TIMM, ("python",), timm=True)
    line = "(RayTrainWorker pid=7) step 12/120  loss 2.3063  top1 0.062  10.8 img/s"
    assert ours.step(line) == 12
    assert ours.step("eval @ step 120: val/top1 0.1562") is None
    # timm numbers the update it has just finished from 0
    assert timm.step("Train: 0 [   0/120 (  1%)]  Loss: 2.43 (2.34)  Time: 2.5s") == 1
    assert timm.step("Train: 0 [ 119/120 (100%)]  Loss: 2.36 (2.36)") == 120
    assert timm.step("Test: [   1/1]  Time: 4.380 (4.667)") is None


def test_the_steady_state_leaves_out_the_first_tenth_of_the_steps():
    run = e2e.Run("ours", batch=32, total=260.0)
    run.arrivals = {step: 30.0 + 2.0 * step for step in range(1, 41)}  # 2 s a step
    run.arrivals[1] = 40.0  # a slow first step is not in the steady state
    figures = run.figures()
    assert run.warm == 4
    assert figures["images_per_s"] == pytest.approx(16.0)  # 32 images every 2 s
    assert figures["first_step_s"] == 40.0
    assert figures["exit_after_last_step_s"] == pytest.approx(260.0 - 110.0)


def test_timm_trains_our_recipe_on_our_shards(tmp_path):
    setting = e2e.Setting("nfnet_f0", "dm_nfnet_f0", 64, 32, 120, 64)
    raw = e2e.ours_config(setting, f"file://{tmp_path}/shards")
    config = load_config(None, [f"{section}.{key}={value}" for section, values in raw.items()
                                for key, value in values.items()])  # fmt: skip
    plan = make_plan(config, num_classes=10, train_samples=3840, val_samples=64)
    side = e2e.timm_side(Path("train.py"), setting, config, plan)
    words = side.run_command(tmp_path / "out")
    flags = {  # each flag and its value (None for a switch)
        word: None if following.startswith("-") else following
        for word, following in zip(words, [*words[1:], "-"], strict=True)
        if word.startswith("-")
    }
    assert words[1] == "train.py" and words[-2:] == ["--output", str(tmp_path / "out")]
    assert flags["--data-dir"] == f"{tmp_path}/shards" and flags["--dataset"].startswith("wds/")
    assert flags["--train-num-samples"] == "3840"  # one epoch of 120 steps of 32
    assert flags["--lr"] == str(plan.peak_lr) == "0.0125"  # DM: 0.1 x 32 / 256
    assert (flags["--clip-grad"], flags["--clip-mode"]) == ("0.01", "agc")
    assert flags["--smoothing"] == "0.1" and flags["--model-ema"] is None
    assert flags["--model-ema-decay"] == "0.99999"
    assert (flags["--drop"], flags["--drop-path"]) == (
        str(plan.drop_rate),
        str(plan.stochdepth_rate),
    )
    assert (flags["-j"], flags["--img-size"], flags["-b"]) == ("1", "64", "32")


def test_the_smoke_mode_times_a_pair_of_real_runs(capsys):
    figures = e2e.main(["--smoke"])
    assert figures["sides"] == [e2e.WITHOUT_RAY, f"{e2e.WITHOUT_RAY} (again)"]
    (ratio,) = figures["pair_ratios"]
    assert figures["ratio"] == ratio and math.isfinite(ratio) and ratio > 0
    for (run,) in figures["runs"].values():
        assert run["images_per_s"] > 0
        assert 0 < run["first_step_s"] < run["total_s"]
        assert run["exit_after_last_step_s"] > 0
        assert all(math.isfinite(load) for load in run["load_average"])
    out = capsys.readouterr().out
    assert "pair 1/1:" in out and "median" in out and "load average" in out
