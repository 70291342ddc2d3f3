"""Top-1/top-5 on the validation split, for the raw and the EMA weights, summed over workers.

DM evaluates in fp32 (DM experiment.py: the forward casts to bf16 only in training mode), hence
``train.eval_precision`` "fp32" by default; "bf16" runs evaluation under bf16 autocast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from pipeline.train.prefetch import DevicePrefetcher

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]
PRECISIONS = ("fp32", "bf16")


def _totals(
    model: torch.nn.Module, batches: Batches, device: torch.device, bf16: bool, limit: int | None
) -> torch.Tensor:
    """(top-1 hits, top-5 hits, samples) of ``model`` over at most ``limit`` batches.

    The sums stay on ``device`` (no host read per batch) and the batches reach it a batch ahead
    (``pipeline.train.prefetch``); the caller reads the totals once.
    """
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for images, labels in DevicePrefetcher(batches, device, limit):
        with torch.autocast(device.type, torch.bfloat16, bf16):
            logits = model(images).float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = torch.stack([(top5[:, 0] == labels).sum(), (top5 == labels[:, None]).any(1).sum()])
        totals[:2] += hits
        totals[2] += labels.numel()
    return totals


@torch.no_grad()
def evaluate(
    models: dict[str, torch.nn.Module],
    eval_batches: Callable[[], Batches],
    *,
    device: torch.device,
    precision: str,
    limit: int | None,
) -> dict[str, float]:
    """``val/top1{suffix}`` and ``val/top5{suffix}`` of each model, over every worker's share.

    ``models`` maps a metric suffix to a model; each is evaluated in eval mode on a fresh pass
    of ``eval_batches()`` and left in training mode, in ``precision`` ("fp32" or "bf16"). Every
    worker must call this (all-reduce).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"evaluation precision must be one of {PRECISIONS}, got {precision!r}")
    results = {}
    for suffix, model in models.items():
        model.eval()
        totals = _totals(model, eval_batches(), device, precision == "bf16", limit)
        model.train()
        if dist.is_initialized():
            dist.all_reduce(totals)
        top1, top5, count = totals.tolist()  # the one host read of this model's evaluation
        results[f"val/top1{suffix}"] = top1 / max(count, 1.0)
        results[f"val/top5{suffix}"] = top5 / max(count, 1.0)
    return results
