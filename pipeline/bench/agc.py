"""``python -m pipeline.bench agc``: AGC over nfnet_f0's parameters against timm, and its share
of an nfnet_f0 training step (forward, backward, SGD_AGC step)."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pipeline.models import create_model
from pipeline.optim import SGD_AGC, adaptive_clip_, param_groups

CLIPPING = 0.01  # DM experiment_nfnets.py: λ = 0.01


def _timed(run: Callable[[], object], prepare: Callable[[], object]) -> float:
    """Seconds ``run`` takes, after an untimed ``prepare``."""
    prepare()
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def compare_with_timm(params: list[torch.Tensor], raw: list[torch.Tensor], repeats: int):
    """Our clip and timm's adaptive_clip_grad on the same tensors, interleaved, fresh grads each."""
    from timm.utils import adaptive_clip_grad

    def fresh_grads() -> None:
        for param, grad in zip(params, raw, strict=True):
            param.grad = grad.clone()

    ours, theirs, fraction = [], [], 0.0
    for _ in range(repeats + 1):  # the first round warms up the allocator and caches
        fresh_grads()
        ours.append(_timed(lambda: adaptive_clip_(params, CLIPPING), fresh_grads))
        theirs.append(_timed(lambda: adaptive_clip_grad(params, CLIPPING), fresh_grads))
    fresh_grads()
    fraction = adaptive_clip_(params, CLIPPING)["clip_fraction"].item()
    ours, theirs = ours[1:], theirs[1:]
    return {
        "agc_ms_min": 1e3 * min(ours),
        "agc_ms_median": 1e3 * statistics.median(ours),
        "timm_ms_min": 1e3 * min(theirs),
        "timm_ms_median": 1e3 * statistics.median(theirs),
        "speedup_min": min(theirs) / min(ours),
        "speedup_median": statistics.median(theirs) / statistics.median(ours),
        "clip_fraction": fraction,
    }


def training_steps(model: torch.nn.Module, batch: int, resolution: int, steps: int):
    """Median ms of an SGD_AGC training step (forward, backward, step) and its last gradients."""
    optimizer = SGD_AGC(param_groups(model, 2e-5, CLIPPING), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, resolution, resolution, generator=generator)
    labels = torch.randint(0, 1000, (batch,), generator=generator)
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        grads = [p.grad.clone() for p in model.parameters()]  # raw, before the clip
        optimizer.step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[1:]), grads


def _report(title: str, figures: dict[str, float]) -> None:
    print(
        f"{title}: ours {figures['agc_ms_min']:.1f} ms min / {figures['agc_ms_median']:.1f} ms "
        f"median, timm adaptive_clip_grad {figures['timm_ms_min']:.1f} / "
        f"{figures['timm_ms_median']:.1f} ms -> {figures['speedup_min']:.2f}x (min) / "
        f"{figures['speedup_median']:.2f}x (median); {100 * figures['clip_fraction']:.1f} % "
        "of units clipped"
    )


def main(argv: list[str]) -> dict[str, float]:
    """Time AGC against timm on nfnet_f0 (random and real gradients) and its share of a step."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench agc")
    parser.add_argument("--repeats", type=int, default=15, help="timed clips per implementation")
    parser.add_argument("--steps", type=int, default=3, help="timed nfnet_f0 training steps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=192, help="DM: F0 trains at 192 px")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model("nfnet_f0")
    params = list(model.parameters())
    count = sum(p.numel() for p in params)
    threads = torch.get_num_threads()
    print(f"nfnet_f0: {count:,} parameters in {len(params)} tensors, {threads} threads")
    figures: dict[str, float] = {"threads": float(threads)}
    # Worst case: every unit clips (N(0, 1e-4) gradients are far above 0.01 * ||W_i||).
    generator = torch.Generator().manual_seed(0)
    noise = [torch.randn(p.shape, generator=generator) * 1e-2 for p in params]
    random = compare_with_timm(params, noise, args.repeats)
    _report("AGC, random gradients", random)
    figures |= {f"random_{key}": value for key, value in random.items()}
    if args.steps > 0:
        step_ms, grads = training_steps(model, args.batch, args.resolution, args.steps)
        real = compare_with_timm(params, grads, args.repeats)
        _report(f"AGC, gradients of a batch-{args.batch} step", real)
        figures |= {f"real_{key}": value for key, value in real.items()}
        figures |= {"step_ms": step_ms, "agc_share": real["agc_ms_median"] / step_ms}
        print(
            f"nfnet_f0 training step (batch {args.batch}, {args.resolution} px, SGD_AGC): "
            f"{step_ms:.0f} ms median; AGC {real['agc_ms_median']:.1f} ms median = "
            f"{100 * figures['agc_share']:.2f} % of the step"
        )
    return figures
