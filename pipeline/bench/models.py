"""``python -m pipeline.bench models``: NFNet-F0 training throughput, ours vs timm, on the CPU.

Forward + backward images/s at batch 8, 192 px, float32, of our ``nfnet_f0`` and timm's
``dm_nfnet_f0`` on the same input in the same run. The models are timed in interleaved rounds
(one step of each per round) and each ratio is the median of the per-round ratios, so a load
change on a shared machine hits both sides alike. Process CPU time is reported next to wall time:
on an oversubscribed machine it is the steadier of the two. Our model computes in channels_last
(NHWC) by default; timm fed a channels_last input is shown too, as the stricter comparison.
Goal: ours / timm >= 1.0 with SAME padding.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from pipeline.models import create_model, load_timm_weights

TIMM = "timm dm_nfnet_f0"
TIMM_NHWC = "timm, channels_last input"


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
    }
    for name, model in models.items():
        if not name.startswith("timm"):
            load_timm_weights(model, reference.state_dict())
        model.train()
    return models


def _paired_ratio(reference: list[float], ours: list[float]) -> float:
    return statistics.median(r / o for r, o in zip(reference, ours, strict=True))


def main(argv: list[str]) -> dict:
    """Run the benchmark, print a report and return the figures."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench models")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
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
    for step in timers.values():  # warm-up: allocator and oneDNN primitive caches
        step()
    wall: dict[str, list[float]] = {name: [] for name in timers}
    cpu: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(args.rounds):
        for name, step in timers.items():
            seconds, cpu_seconds = step()
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
    figures: dict[str, float] = {
        "batch": args.batch,
        "resolution": args.resolution,
        "threads": torch.get_num_threads(),
        "max_abs_logit_diff_timm_numerics": same_output,
    }
    print(f"NFNet-F0 forward+backward, batch {args.batch}, {args.resolution} px, float32, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds")  # fmt: skip
    print(f"  {'model':26s} {'images/s':>8s}  {'ours/timm wall':>14s}  {'ours/timm cpu':>13s}")
    for name in timers:
        key = name.replace(" ", "_").replace("-", "_")
        figures[f"{key}_images_per_s"] = args.batch / statistics.median(wall[name])
        figures[f"{key}_vs_timm_wall"] = _paired_ratio(wall[TIMM], wall[name])
        figures[f"{key}_vs_timm_cpu"] = _paired_ratio(cpu[TIMM], cpu[name])
        rate, by_wall, by_cpu = (
            figures[f"{key}_{s}"] for s in ("images_per_s", "vs_timm_wall", "vs_timm_cpu")
        )
        print(f"  {name:26s} {rate:8.2f}  {by_wall:14.3f}  {by_cpu:13.3f}")
    same, symmetric = "ours official same", "ours official symmetric"
    figures["symmetric_speedup_wall"] = _paired_ratio(wall[same], wall[symmetric])
    figures["symmetric_speedup_cpu"] = _paired_ratio(cpu[same], cpu[symmetric])
    print(f"  symmetric padding speed-up over same (official numerics): "
          f"{figures['symmetric_speedup_wall']:.3f}x wall, "
          f"{figures['symmetric_speedup_cpu']:.3f}x cpu")  # fmt: skip
    print(f"  max |logit difference|, ours (timm numerics) vs timm: {same_output:.2e}")
    return figures
