"""``python -m pipeline.bench gpu``: the pipeline's training step against timm's, on one GPU.

One table, every row the same batch and resolution in the same process:

- ``pipeline``: the pipeline's own ``Trainer`` step (the DeepSpeed engine, SGD_AGC, the EMA,
  the mixed and smoothed targets of MixUp/CutMix, whose images the loader mixes, the lr
  schedule and the NaN/Inf count), built from a run config as a Ray Train worker builds it
  (``train.compile``, ``train.channels_last``);
- ``timm``: timm's ``dm_nfnet_f0`` trained as timm's ``train.py`` trains it: Nesterov SGD, timm's
  ``adaptive_clip_grad`` on every parameter but the classifier, timm's Mixup/CutMix with label
  smoothing and ``SoftTargetCrossEntropy``, ``ModelEmaV3``, ``torch.compile(model)`` when compiled.

Each eager and compiled, NCHW and NHWC, bf16 autocast (fp32 on the CPU). DM's recipe for both:
192 px (DM base.py: F0 trains at 192), λ = 0.01, the variant's dropout and stochastic depth.
Both are fed one batch resident on the device, so the rows time the step, not the data path
(timm mixes its images in the step, the pipeline in its loader). Per row: images/s after the
warm-up steps (which pay for compilation), the ratio to timm's row of the same mode and layout,
MFU (``pipeline.train.mfu``: 6 × the forward's multiply-adds × images/s ÷ the device's peak)
and the peak memory the step allocated.

Under the table, one line says whether the Trainer's step is free of host syncs on the GPU:
its steps run under ``torch.cuda.set_sync_debug_mode("error")`` (``sync_check``; skipped on
the CPU, which has no device to sync with).

``--smoke``: the same code at tiny sizes on the CPU in seconds (our ``nfnet_nano`` against timm's
NFNet class built with DM's F0 configuration shrunk to nano's stages, 32 px, fp32, compiled with
Dynamo's ``eager`` backend: the tracing without Inductor's C++ builds); the test suite runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import logging
import math
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map

from pipeline.config import RunConfig, load_config
from pipeline.models import get_variant
from pipeline.train.batches import describe_dataset
from pipeline.train.mfu import Peak, device_peak, train_flops_per_image
from pipeline.train.plan import make_plan
from pipeline.train.trainer import Trainer
from pipeline.train.worker import use_this_environments_build_tools

log = logging.getLogger(__name__)

CLIPPING = 0.01  # DM experiment_nfnets.py: λ = 0.01
LAYOUTS = {"NCHW": False, "NHWC": True}
MODES = {"eager": False, "compiled": True}


@dataclasses.dataclass(frozen=True)
class Setting:
    """What one run of the suite measures."""

    device: torch.device
    model: str
    batch: int
    resolution: int
    classes: int
    warmup: int
    steps: int
    backend: str  # torch.compile's backend
    precision: str


class LocalTrainer(Trainer):
    """The pipeline's Trainer in this process, outside Ray Train: it starts at step 0."""

    def restore(self) -> int:
        return 0


@contextmanager
def single_process_group(device: torch.device) -> Iterator[None]:
    """A torch.distributed group of this process alone (rank 0 of 1), as DeepSpeed needs one.

    The group is created once and kept for the process's life: DeepSpeed caches the first group
    it sees (``deepspeed.utils.groups``), so a second group would meet a stale one. The
    launcher's variables DeepSpeed reads (``LOCAL_RANK``, ...) are set while the block runs.
    """
    group_env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    if not dist.is_initialized():
        with socket.socket() as probe:  # a free port for the group's store
            probe.bind(("127.0.0.1", 0))
            group_env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(probe.getsockname()[1])}
    saved = {key: os.environ.get(key) for key in group_env}
    os.environ.update(group_env)
    try:
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            use_this_environments_build_tools()
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, rank=0, world_size=1)
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def local_trainer(config: RunConfig, run_id: str | None = None) -> LocalTrainer:
    """The Trainer a Ray Train worker would build from ``config`` (inside single_process_group);
    with ``run_id``, rank 0's MLflow logging goes to that run."""
    shape = describe_dataset(config.data.train_url)
    plan = make_plan(config, shape.num_classes, shape.train_samples, shape.val_samples)
    return LocalTrainer(config, plan, run_id=run_id)


def _seconds_per_step(step: Callable[[], None], setting: Setting) -> float:
    synchronize = torch.cuda.synchronize if setting.device.type == "cuda" else lambda: None
    for _ in range(setting.warmup):  # compilation, cuDNN autotuning, the allocator's pools
        step()
    synchronize()
    started = time.perf_counter()
    for _ in range(setting.steps):
        step()
    synchronize()
    return (time.perf_counter() - started) / setting.steps


def pipeline_config(
    setting: Setting, compiled: bool, channels_last: bool, *overrides: str
) -> RunConfig:
    """The run config of the pipeline's rows: DM's recipe on synthetic data of the setting."""
    size = setting.resolution
    url = f"synthetic://?samples={setting.batch}&classes={setting.classes}&resolution={size}"
    inductor = compiled and setting.backend == "inductor"
    return load_config(
        None,
        [
            f"model.name={setting.model}",
            f"data.train_url={url}",
            f"data.train_resolution={size}",
            f"data.test_resolution={size}",
            f"train.global_batch={setting.batch}",
            f"train.micro_batch={setting.batch}",
            f"train.steps={setting.warmup + setting.steps}",
            f"train.precision={setting.precision}",
            f"train.channels_last={str(channels_last).lower()}",
            f"train.compile={str(inductor).lower()}",  # the Trainer's own path on a GPU
            f"optim.clipping={CLIPPING}",
            f"scaling.use_gpu={str(setting.device.type == 'cuda').lower()}",
            *overrides,
        ],
    )


def pipeline_row(setting: Setting, compiled: bool, channels_last: bool) -> tuple[float, float]:
    """Seconds per step of the pipeline's Trainer, and its training FLOPs per image."""
    size = setting.resolution
    inductor = compiled and setting.backend == "inductor"
    trainer = local_trainer(pipeline_config(setting, compiled, channels_last))
    if compiled and not inductor:
        trainer.model.compile(backend=setting.backend)
    # The first step's micro-batches, as the Trainer's source makes them, moved once.
    first = next(trainer.batches.steps(0))
    batch = tree_map(lambda item: item.to(setting.device), first)
    batches: Iterator = itertools.repeat(batch)
    seconds = _seconds_per_step(lambda: trainer.run_step(batches), setting)
    return seconds, train_flops_per_image(trainer.model, size)


def timm_model(setting: Setting) -> torch.nn.Module:
    """timm's dm_nfnet_f0 (or, for ``--smoke``, its NFNet class with nano-sized stages)."""
    import timm
    from timm.models.nfnet import NormFreeNet, model_cfgs

    variant = get_variant(setting.model)  # the same dropout and stochastic depth as ours
    rates = {"drop_rate": variant.drop_rate, "drop_path_rate": variant.stochdepth_rate}
    if setting.model == "nfnet_f0":
        return timm.create_model("dm_nfnet_f0", num_classes=setting.classes, **rates)
    shrunk = dataclasses.replace(
        model_cfgs["dm_nfnet_f0"],
        depths=(1, 1, 1, 1),
        channels=(32, 64, 64, 64),
        stem_chs=16,
        group_size=16,
        num_features=128,
    )
    return NormFreeNet(shrunk, num_classes=setting.classes, **rates)


def timm_row(setting: Setting, compiled: bool, channels_last: bool) -> tuple[float, float]:
    """Seconds per step of timm's training step (as its train.py runs it), its FLOPs per image."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.models import model_parameters
    from timm.utils import ModelEmaV3, adaptive_clip_grad

    device, size = setting.device, setting.resolution
    torch.manual_seed(0)
    model = timm_model(setting).to(device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    flops = train_flops_per_image(model, size)
    ema = ModelEmaV3(model, decay=0.99999)  # DM experiment_nfnets.py: EMA decay 0.99999
    clipped = model_parameters(model, exclude_head=True)  # timm train.py: AGC spares the head
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=2e-5
    )
    mixup = Mixup(
        mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=setting.classes
    )
    criterion = SoftTargetCrossEntropy()
    forward = torch.compile(model, backend=setting.backend) if compiled else model
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(setting.batch, 3, size, size, generator=generator)
    images = images.to(device).contiguous(memory_format=layout)
    labels = torch.randint(0, setting.classes, (setting.batch,), generator=generator).to(device)
    bf16 = setting.precision == "bf16"

    def step() -> None:
        mixed, targets = mixup(images, labels)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            loss = criterion(forward(mixed), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        adaptive_clip_grad(clipped, CLIPPING)
        optimizer.step()
        ema.update(model)

    return _seconds_per_step(step, setting), flops


def measure(setting: Setting, peak: Peak) -> list[dict[str, float | str]]:
    """Every row of the table, pipeline then timm, for each mode and layout."""
    rows = []
    for mode, layout in itertools.product(MODES, LAYOUTS):
        timm_rate = math.nan
        for side, run_row in (("timm", timm_row), ("pipeline", pipeline_row)):
            if setting.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            torch._dynamo.reset()  # each compiled row compiles its own model
            seconds, flops = run_row(setting, MODES[mode], LAYOUTS[layout])
            rate = setting.batch / seconds
            timm_rate = rate if side == "timm" else timm_rate
            memory = math.nan
            if setting.device.type == "cuda":
                memory = torch.cuda.max_memory_allocated() / 2**30
            mfu = rate * flops / 1e12 / peak.tflops if peak.tflops else math.nan
            rows.append(
                {
                    "row": f"{side} {mode} {layout}",
                    "images_per_s": rate,
                    "vs_timm": rate / timm_rate,
                    "mfu": mfu,
                    "peak_memory_gib": memory,
                }
            )
            gc.collect()  # the row's engine, model and optimizer state before the next row
            if setting.device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def sync_check(setting: Setting, checked: int = 3) -> str:
    """``pass``, or ``FAIL: ...`` naming the first host sync in the Trainer's step.

    The pipeline's Trainer, fed by its own data path (synthetic micro-batches, pinned and
    copied a step ahead by ``pipeline.train.prefetch``), takes ``setting.warmup`` steps (cuDNN
    autotuning, the allocator's pools, DeepSpeed's lazy state and compilation may sync), then
    ``checked`` steps under ``torch.cuda.set_sync_debug_mode("error")``: a read of a device
    value or a blocking copy anywhere in them raises. None of the checked steps logs or
    checkpoints, where the Trainer reads its flags and sums on purpose. On the CPU there is no
    device to sync with: the check is skipped and says so.
    """
    if setting.device.type != "cuda":
        return "skipped (no CUDA device: the CPU has nothing to sync with)"
    total = setting.warmup + checked + 1  # never the last step, which always logs
    quiet = (f"train.steps={total}", f"train.log_every={total}", f"checkpoint.every_steps={total}")
    trainer = local_trainer(pipeline_config(setting, True, False, *quiet))
    steps = trainer.batches.steps(0)
    for _ in range(setting.warmup):
        trainer.run_step(steps)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(checked):
            trainer.run_step(steps)
    except RuntimeError as error:
        return f"FAIL: {str(error).splitlines()[0]} ({_where(error)})"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return "pass"


def _where(error: BaseException) -> str:
    """The innermost frame of ``error`` and the innermost of this project's that led to it."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [frame for frame in frames if "/pipeline/" in frame.filename]
    text = f"in {'/'.join(Path(frames[-1].filename).parts[-2:])}:{frames[-1].lineno}"
    if ours and ours[-1] is not frames[-1]:
        text += f", called from {Path(ours[-1].filename).name}:{ours[-1].lineno}"
    return text


def format_table(rows: list[dict[str, float | str]]) -> str:
    """The rows as one text table."""
    lines = [f"  {'row':26s} {'images/s':>10s} {'vs timm':>8s} {'MFU':>7s} {'peak GiB':>9s}"]
    for row in rows:
        memory = "-" if math.isnan(row["peak_memory_gib"]) else f"{row['peak_memory_gib']:.2f}"
        mfu = "-" if math.isnan(row["mfu"]) else f"{100 * row['mfu']:.2f} %"
        lines.append(
            f"  {row['row']:26s} {row['images_per_s']:10.2f} {row['vs_timm']:8.3f} "
            f"{mfu:>7s} {memory:>9s}"
        )
    return "\n".join(lines)


def _setting(args: argparse.Namespace) -> Setting:
    if args.smoke:
        return Setting(torch.device("cpu"), "nfnet_nano", 4, 32, 10, 1, 2, "eager", "fp32")
    if not torch.cuda.is_available():
        print("bench gpu: no CUDA GPU on this machine (--smoke runs on the CPU)", file=sys.stderr)
        raise SystemExit(2)
    return Setting(
        torch.device("cuda", 0),
        "nfnet_f0",
        args.batch,
        args.resolution,
        1000,  # ImageNet's classes
        args.warmup,
        args.steps,
        "inductor",
        "bf16",
    )


def main(argv: list[str]) -> dict:
    """Measure every row, print the table and return its figures."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench gpu")
    parser.add_argument("--batch", type=int, default=128, help="per step, both sides")
    parser.add_argument("--resolution", type=int, default=192, help="DM base.py: F0 trains at 192")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (compile here)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak (default: table)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, in seconds")
    args, _ = parser.parse_known_args(argv)
    setting = _setting(args)
    if setting.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.set_device(setting.device)
    peak = device_peak(setting.device, setting.precision, args.peak_tflops)
    with single_process_group(setting.device):
        rows = measure(setting, peak)
        sync = sync_check(setting)
    name = torch.cuda.get_device_name() if setting.device.type == "cuda" else "CPU"
    peak_text = "unknown" if peak.tflops is None else f"{peak.tflops:.4g} TFLOP/s"
    print(
        f"{name}: {setting.model} vs timm, batch {setting.batch}, {setting.resolution} px, "
        f"{setting.precision}, {setting.steps} timed steps after {setting.warmup}, torch.compile "
        f"backend {setting.backend}; peak {peak_text} ({peak.source})"
    )
    print(format_table(rows))
    print(f"  sync-free training step (torch.cuda.set_sync_debug_mode('error')): {sync}")
    figures = {"device": name, "peak_tflops": peak.tflops, "peak_source": peak.source}
    return figures | {"rows": rows, "sync_free_step": sync}
