"""The Trainer's step reads nothing back from its tensors: the NaN/Inf skip, the EMA and the
averages are decided on the device, and the flags are read at log lines and checkpoints.

On the CPU a read costs no device sync, so these tests watch the reads themselves (a torch
function mode that sees every ``item``, ``tolist``, ``bool``, ... called from Python); on a GPU
``python -m pipeline.bench gpu`` runs the step under ``torch.cuda.set_sync_debug_mode("error")``,
which also sees the reads torch makes in C++ (blocking copies).
"""

from __future__ import annotations

import copy
import itertools
import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from pipeline.bench import gpu
from pipeline.bench.gpu import local_trainer, single_process_group
from pipeline.config import load_config
from pipeline.train.nonfinite import NonfiniteStepError

READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"}


class HostReads(TorchFunctionMode):
    """Records (file, function) of the project's code behind every read of a tensor's value."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS:
            ours = [f for f in traceback.extract_stack() if "/pipeline/" in f.filename]
            self.reads.append((Path(ours[-1].filename).name, ours[-1].name) if ours else ("", ""))
        return func(*args, **(kwargs or {}))


def trainer_for(*overrides: str):
    url = "synthetic://?samples=64&classes=10&resolution=16"
    config = load_config(
        None,
        [
            "model.name=nfnet_nano",
            "data.train_url=" + url + "".join(o for o in overrides if o.startswith("&")),
            "data.train_resolution=16",
            "train.global_batch=8",
            "train.micro_batch=4",  # two micro-batches per step: the accumulation path
            "train.steps=20",
            "checkpoint.every_steps=100",
            *(o for o in overrides if not o.startswith("&")),
        ],
    )
    return local_trainer(config)


def test_a_step_reads_no_tensor_but_agcs_cpu_only_clip_counts_and_a_log_step_reads_twice():
    with single_process_group(torch.device("cpu")):
        trainer = trainer_for("train.log_every=3")
        prepared = iter(list(itertools.islice(trainer.batches.steps(0), 3)))
        trainer.run_step(prepared)  # made before the watch: the data recipe reads its draws
        with HostReads() as watch:
            trainer.run_step(prepared)
        # AGC reads its per-tensor clip counts only on the CPU, where a read is free
        # (pipeline/optim/agc.py _clip_bucket); nothing else in the step reads.
        assert set(watch.reads) == {("agc.py", "_clip_bucket")}
        with HostReads() as watch:
            trainer.run_step(prepared)  # step 3: log_every=3, the flags are read
            trainer.log(0.0)
        others = [read for read in watch.reads if read != ("agc.py", "_clip_bucket")]
        assert others == [("nonfinite.py", "read"), ("metrics.py", "_read")]


def state_of(trainer) -> dict[str, torch.Tensor]:
    """Weights, momentum buffers and EMA weights, copied."""
    state = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    state |= {f"ema.{k}": v for k, v in trainer.ema.module.state_dict().items()}
    for name, param in trainer.model.named_parameters():
        state[f"momentum.{name}"] = trainer.optimizer.state[param]["momentum_buffer"]
    return copy.deepcopy(state)


def test_a_nan_step_moves_nothing_and_stop_ends_the_run_at_the_next_read_naming_it():
    with single_process_group(torch.device("cpu")):
        trainer = trainer_for("&nonfinite_steps=2", "train.nonfinite=stop", "train.log_every=3")
        steps = trainer.batches.steps(0)
        trainer.run_step(steps)
        after_first = state_of(trainer)
        trainer.run_step(steps)  # the NaN step: skipped on the device, not yet read
        assert trainer.nonfinite.total == 0 and len(trainer.nonfinite.pending) == 2
        after_nan = state_of(trainer)
        for key, value in after_first.items():
            assert torch.equal(after_nan[key], value), key
        with pytest.raises(NonfiniteStepError, match=r"^step 2: .*train\.nonfinite=stop"):
            trainer.run_step(steps)  # step 3 is a log step: the flags are read before its log
        assert trainer.nonfinite.total == 1


def test_under_skip_the_log_line_counts_the_step_and_averages_without_it():
    with single_process_group(torch.device("cpu")):
        trainer = trainer_for("&nonfinite_steps=2", "train.log_every=3")
        steps = trainer.batches.steps(0)
        for _ in range(3):
            trainer.run_step(steps)
        assert (trainer.nonfinite.total, trainer.nonfinite.pending) == (1, [])
        losses = torch.stack(trainer.stats.loss).tolist()
        kept = losses[:2] + losses[4:]  # step 2's two micro-batches are left out
        assert sum(1 for loss in losses if loss != loss) >= 1  # the poisoned micro-batch: NaN
        metrics = trainer.log(0.0)
        assert metrics["train/loss"] == pytest.approx(sum(kept) / 4)
        assert metrics["train/nonfinite_steps"] == 1.0


def test_the_gpu_suites_sync_check_says_it_is_skipped_on_the_cpu():
    setting = gpu.Setting(torch.device("cpu"), "nfnet_nano", 4, 16, 10, 1, 2, "eager", "fp32")
    assert gpu.sync_check(setting) == "skipped (no CUDA device: the CPU has nothing to sync with)"
