"""``python -m pipeline.bench models``: NFNet-F0 training throughput, ours vs timm, on the CPU.

Forward + backward images/s at batch 8, 192 px, float32, of our ``nfnet_f0`` and timm's
``dm_nfnet_f0`` on the same input in the same run, each eager and compiled (``torch.compile``,
Inductor; the first compiled step, which builds the kernels, is left out as warm-up). The models
are timed in interleaved rounds (one step of each per round) and each ratio is the median of the
per-round ratios, so a load change on a shared machine hits both sides alike. Process CPU time
is reported next to wall time: on an oversubscribed machine it is the steadier of the two. Our
model computes in channels_last (NHWC) by default; timm fed a channels_last input is shown too,
as the stricter comparison. Goal: ours / timm >= 1.0 with SAME padding.

Each round also times a square fp32 matmul (``pipeline.train.mfu.matmul_tflops``, the BLAS's
sgemm at the same thread count), and each row's training FLOP/s (6 × the forward's multiply-adds
× images/s, as ``train/mfu`` counts them) is given as a fraction of that measured peak (goal:
>= 0.75 for our best mode). ``--profile`` adds where one step of our compiled model spends its
time: in convolutions and matmuls (forward and backward), or elsewhere.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from pipeline.models import count_flops, create_model, load_timm_weights
from pipeline.train.mfu import FLOPS_PER_MULTIPLY_ADD, FORWARD_AND_BACKWARD, matmul_tflops

TIMM = "timm dm_nfnet_f0"
TIMM_NHWC = "timm, channels_last input"
TIMM_COMPILED = "timm compiled"
OURS_COMPILED = "ours official same compiled"
# Substrings of the profiler's op names that do the counted multiply-adds, forward and backward:
# aten::mkldnn_convolution, aten::_slow_conv2d_forward/backward (im2col + sgemm, which torch picks
# for unstrided 1x1 convs of a batch under 16 on one thread), aten::convolution_backward, mm, addmm.
MATMUL_OPS = ("conv", "mm", "linear")


def _step_timer(model: torch.nn.Module, images: torch.Tensor) -> Callable[[], tuple[float, float]]:
    def step() -> tuple[float, float]:
        model.zero_grad(set_to_none=True)
        wall, cpu = time.perf_counter(), time.process_time()
        model(images).logsumexp(dim=1).sum().backward()
        return time.perf_counter() - wall, time.process_time() - cpu

    return step


def _models() -> dict[str, torch.nn.Module]:
    import timm  # dev dependency: only the benchmark and the tests use it, as the reference

    torch.manual_seed(0)
    reference = timm.create_model("dm_nfnet_f0", pretrained=False)
    # timm's default computation: no dropout, no stochastic depth.
    plain = {"drop_rate": 0.0, "stochdepth_rate": 0.0}
    models = {
        TIMM: reference,
        "ours timm-numerics same": create_model("nfnet_f0", numerics="timm", **plain),
        "ours official same": create_model("nfnet_f0", **plain),
        "ours official symmetric": create_model("nfnet_f0", padding="symmetric", **plain),
        # Ours converts activations to channels_last; these two lines separate that effect.
        "ours official same NCHW": create_model("nfnet_f0", channels_last=False, **plain),
        TIMM_NHWC: reference,
        TIMM_COMPILED: reference,
        OURS_COMPILED: create_model("nfnet_f0", **plain),
    }
    for name, model in models.items():
        if not name.startswith("timm"):
            load_timm_weights(model, reference.state_dict())
        model.train()
    models[OURS_COMPILED].compile()  # in place, as train.compile does it
    models[TIMM_COMPILED] = torch.compile(reference)  # as timm's train.py --torchcompile does
    return models


def _paired_ratio(reference: list[float], ours: list[float]) -> float:
    return statistics.median(r / o for r, o in zip(reference, ours, strict=True))


def where_time_goes(model: torch.nn.Module, images: torch.Tensor, flops: float, peak: float):
    """One profiled step: the share of its time in convolutions and matmuls (forward and
    backward), and the fraction of the sgemm peak those ops reach while they run."""
    from torch.profiler import ProfilerActivity, profile

    step = _step_timer(model, images)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        seconds, _ = step()
    matmul_us = sum(
        event.self_cpu_time_total
        for event in profiled.key_averages()
        if any(op in event.key for op in MATMUL_OPS)
    )
    matmul_s = matmul_us / 1e6
    return matmul_s / seconds, flops / matmul_s / 1e12 / peak


def main(argv: list[str]) -> dict:
    """Run the benchmark, print a report and return the figures."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench models")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--profile", action="store_true", help="where our compiled step's time goes"
    )
    args, _ = parser.parse_known_args(argv)
    if args.threads:
        # With another process busy on a core, 2 OpenMP threads spin-wait on each other; one
        # thread then gives the steadier ratio.
        torch.set_num_threads(args.threads)
    models = _models()
    images = torch.randn(args.batch, 3, args.resolution, args.resolution)
    with torch.no_grad():
        expected = models[TIMM](images)
        same_output = (models["ours timm-numerics same"](images) - expected).abs().max().item()
    nhwc = images.contiguous(memory_format=torch.channels_last)
    timers = {
        name: _step_timer(model, nhwc if name == TIMM_NHWC else images)
        for name, model in models.items()
    }
    for step in timers.values():  # warm-up: allocator, oneDNN primitive caches, compilation
        step()
    wall: dict[str, list[float]] = {name: [] for name in timers}
    cpu: dict[str, list[float]] = {name: [] for name in timers}
    sgemm: list[float] = []
    for _ in range(args.rounds):
        sgemm.append(matmul_tflops())
        for name, step in timers.items():
            seconds, cpu_seconds = step()
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
    peak = statistics.median(sgemm)
    flops = FLOPS_PER_MULTIPLY_ADD * FORWARD_AND_BACKWARD * count_flops("nfnet_f0", args.resolution)
    figures: dict[str, float] = {
        "batch": args.batch,
        "resolution": args.resolution,
        "threads": torch.get_num_threads(),
        "max_abs_logit_diff_timm_numerics": same_output,
        "sgemm_tflops": peak,
        "train_gflops_per_image": flops / 1e9,
    }
    print(
        f"NFNet-F0 forward+backward, batch {args.batch}, {args.resolution} px, float32, "
        f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds; measured sgemm "
        f"{1e3 * peak:.1f} GFLOP/s (median of {min(sgemm) * 1e3:.1f}-{max(sgemm) * 1e3:.1f})"
    )
    print(
        f"  {'model':27s} {'images/s':>8s}  {'ours/timm wall':>14s}  {'ours/timm cpu':>13s}"
        f"  {'of sgemm':>8s}"
    )
    for name in timers:
        key = name.replace(" ", "_").replace("-", "_")
        # A compiled row is compared with timm compiled, every other with timm eager.
        reference = TIMM_COMPILED if name == OURS_COMPILED else TIMM
        rate = args.batch / statistics.median(wall[name])
        figures[f"{key}_images_per_s"] = rate
        figures[f"{key}_vs_timm_wall"] = by_wall = _paired_ratio(wall[reference], wall[name])
        figures[f"{key}_vs_timm_cpu"] = by_cpu = _paired_ratio(cpu[reference], cpu[name])
        figures[f"{key}_sgemm_fraction"] = fraction = rate * flops / 1e12 / peak
        print(f"  {name:27s} {rate:8.2f}  {by_wall:14.3f}  {by_cpu:13.3f}  {fraction:8.3f}")
    same, symmetric = "ours official same", "ours official symmetric"
    figures["symmetric_speedup_wall"] = _paired_ratio(wall[same], wall[symmetric])
    figures["symmetric_speedup_cpu"] = _paired_ratio(cpu[same], cpu[symmetric])
    figures["compiled_speedup_wall"] = _paired_ratio(wall[same], wall[OURS_COMPILED])
    figures["compiled_speedup_cpu"] = _paired_ratio(cpu[same], cpu[OURS_COMPILED])
    print(
        f"  symmetric padding speed-up over same (official numerics): "
        f"{figures['symmetric_speedup_wall']:.3f}x wall, "
        f"{figures['symmetric_speedup_cpu']:.3f}x cpu"
    )
    print(
        f"  compiled speed-up over eager (ours, official same): "
        f"{figures['compiled_speedup_wall']:.3f}x wall, {figures['compiled_speedup_cpu']:.3f}x cpu"
    )
    print(f"  max |logit difference|, ours (timm numerics) vs timm: {same_output:.2e}")
    if args.profile:
        for name in ("ours official same", OURS_COMPILED):
            share, efficiency = where_time_goes(models[name], images, flops * args.batch, peak)
            figures[f"{name.replace(' ', '_')}_matmul_share"] = share
            figures[f"{name.replace(' ', '_')}_matmul_sgemm_fraction"] = efficiency
            print(
                f"  {name}: convolutions and matmuls take {100 * share:.1f} % of a step and "
                f"run at {efficiency:.3f} of the sgemm peak while they do"
            )
    return figures
