"""train.compile: the Trainer's compiled step against its eager step, graph breaks, recompiles.

The first compile of nfnet_micro's training graph costs about a minute of Inductor's C++ builds
on 2 cores; Inductor caches them (``/tmp/torchinductor_$USER``), so later runs take seconds.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch._dynamo.utils import counters

from pipeline.bench.gpu import local_trainer, single_process_group
from pipeline.config import load_config
from pipeline.models import create_model
from pipeline.train.compiling import use_compile

STEPS = 5


def _losses_and_compiles(compiled: bool) -> tuple[list[float], list[int]]:
    """Per-step losses of 5 nfnet_micro steps; graphs compiled so far after each step."""
    config = load_config(
        None,
        [
            "model.name=nfnet_micro",
            "data.train_url=synthetic://?samples=64&classes=10&resolution=32",
            "data.train_resolution=32",
            "train.global_batch=16",
            "train.micro_batch=8",  # 2 accumulation slots: two forwards per step
            f"train.steps={STEPS}",
            f"train.compile={str(compiled).lower()}",
            "optim.lr=0.2",  # the demo's: large enough that 5 steps move the loss
        ],
    )
    trainer = local_trainer(config)
    steps = trainer.batches.steps(0)
    losses, compiles = [], []
    for _ in range(STEPS):
        trainer.run_step(steps)
        losses.append(torch.stack(trainer.stats.loss[-2:]).mean().item())
        compiles.append(counters["stats"]["unique_graphs"])
    return losses, compiles


def test_a_compiled_step_trains_as_the_eager_step_and_compiles_once():
    with single_process_group(torch.device("cpu")):
        eager, _ = _losses_and_compiles(False)
        counters.clear()
        torch._dynamo.reset()
        compiled, compiles = _losses_and_compiles(True)
    # Dropout and stochastic depth are on (nfnet_micro's 0.2 and 0.1) and draw the same numbers.
    assert compiled[-1] == pytest.approx(eager[-1], rel=1e-4)
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert eager[-1] != pytest.approx(eager[0], rel=1e-3)  # the 5 steps did train
    # One graph, compiled in the first step (its backward comes with it); none after warm-up.
    assert compiles[0] == 1
    assert compiles[1:] == [compiles[0]] * (STEPS - 1)


def test_nfnet_nano_forward_and_backward_trace_without_a_graph_break():
    model = create_model("nfnet_nano", num_classes=10).train()
    images = torch.randn(4, 3, 32, 32)
    explained = torch._dynamo.explain(model)(images)
    # One forward graph; AOTAutograd derives the backward from it, so no break can occur there.
    assert explained.break_reasons == []
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def test_compile_defaults_to_on_for_a_gpu_and_off_for_the_cpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert (use_compile(None, gpu), use_compile(None, cpu)) == (True, False)
    for setting, device in itertools.product((True, False), (cpu, gpu)):
        assert use_compile(setting, device) is setting
