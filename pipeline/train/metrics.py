"""What a run reports: sums between two log lines, the console lines, rank 0's MLflow logger."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import partial

import torch

from pipeline.config import RunConfig
from pipeline.train.mfu import Utilisation, utilisation
from pipeline.train.plan import Plan

log = logging.getLogger(__name__)


@dataclass
class StepStats:
    """Running sums between two log lines. A step adds its tensors as they are, on the device,
    without a host read; ``summary`` reads them all at once and leaves out the steps the
    optimizer skipped (NaN/Inf), whose loss would spoil the averages of the whole line."""

    loss: list[torch.Tensor] = field(default_factory=list)  # per micro-batch
    correct: list[torch.Tensor] = field(default_factory=list)  # per micro-batch: top-1 hits
    clip_fraction: list[torch.Tensor] = field(default_factory=list)  # per step
    grad_norm: list[torch.Tensor] = field(default_factory=list)  # per step
    skipped: list[torch.Tensor] = field(default_factory=list)  # per step: 0-d bool
    micro_batches: list[int] = field(default_factory=list)  # per step
    step_samples: list[int] = field(default_factory=list)  # per step
    samples: int = 0  # every sample, skipped steps' too: the throughput counts them
    step_time: float = 0.0
    data_time: float = 0.0
    allreduce_time: float = 0.0

    def add_step(
        self,
        losses: list[torch.Tensor],
        correct: list[torch.Tensor],
        samples: int,
        optimizer_stats: dict[str, torch.Tensor],
        skipped: torch.Tensor,
    ) -> None:
        """One step's micro-batch losses and hits, its AGC statistics and its NaN/Inf flag."""
        self.loss += losses
        self.correct += correct
        missing = losses[0].new_full((), math.nan)  # no optimizer step: nothing to average
        self.clip_fraction.append(optimizer_stats.get("clip_fraction", missing).detach())
        self.grad_norm.append(optimizer_stats.get("grad_norm", missing).detach())
        self.skipped.append(skipped)
        self.micro_batches.append(len(losses))
        self.step_samples.append(samples)
        self.samples += samples

    def _read(self) -> list[list[float]]:
        """Every tensor kept, as Python floats, in one host read (list by list)."""
        lists = (self.loss, self.correct, self.clip_fraction, self.grad_norm, self.skipped)
        if not self.skipped:
            return [[] for _ in lists]
        values = torch.cat([torch.stack(tensors).double().flatten() for tensors in lists])
        flat, read = values.tolist(), []
        for tensors in lists:
            read.append(flat[: len(tensors)])
            flat = flat[len(tensors) :]
        return read

    def summary(self, workers: int) -> dict[str, float]:
        """Averages since the last log line over the steps that were not skipped (NaN when
        every step was), as MLflow metrics."""
        loss, correct, clip_fraction, grad_norm, skipped = self._read()
        kept_steps = [not flag for flag in skipped]
        kept = [
            k for k, count in zip(kept_steps, self.micro_batches, strict=True) for _ in range(count)
        ]
        images_per_s = self.samples * workers / max(self.step_time, 1e-9)
        samples = sum(n for n, k in zip(self.step_samples, kept_steps, strict=True) if k)
        hits = sum(c for c, k in zip(correct, kept, strict=True) if k)
        metrics = {
            "train/loss": _mean(loss, kept),
            "train/top1": hits / samples if samples else math.nan,
            "train/images_per_s": images_per_s,
            "train/images_per_s_per_worker": images_per_s / workers,
            "train/data_wait_fraction": self.data_time / max(self.step_time, 1e-9),
        }
        if self.allreduce_time:
            metrics["train/allreduce_fraction"] = self.allreduce_time / max(self.step_time, 1e-9)
        kept_stats = [k and math.isfinite(g) for k, g in zip(kept_steps, grad_norm, strict=True)]
        if any(kept_stats):
            metrics["train/agc_clip_fraction"] = _mean(clip_fraction, kept_stats)
            metrics["train/grad_norm"] = _mean(grad_norm, kept_stats)
        return metrics


def _mean(values: list[float], kept: list[bool]) -> float:
    chosen = [value for value, keep in zip(values, kept, strict=True) if keep]
    return sum(chosen) / len(chosen) if chosen else math.nan


def duration(seconds: float) -> str:
    """``1h05m`` from an hour on, ``4m07s`` below."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def progress_line(step: int, total_steps: int, metrics: dict[str, float], eta: float) -> str:
    """The console line of a log step: position, loss, top-1, throughput, MFU, time left."""
    speed = f"{metrics['train/images_per_s']:.1f} img/s"
    if "train/tflops_per_worker" in metrics:
        speed += f"  {metrics['train/tflops_per_worker']:.3g} TFLOP/s per worker"
    if "train/mfu" in metrics:
        speed += f"  MFU {100 * metrics['train/mfu']:.1f} %"
    return (
        f"step {step}/{total_steps}  loss {metrics['train/loss']:.4f}  "
        f"top1 {metrics['train/top1']:.3f}  {speed}  ETA {duration(eta)}"
    )


def eval_line(step: int, metrics: dict[str, float]) -> str:
    """The console line of an evaluation."""
    shown = "  ".join(f"{key} {value:.4f}" for key, value in metrics.items())
    return f"eval @ step {step}: {shown}"


def open_run_logger(config: RunConfig, run_id: str | None, rank: int):
    """Rank 0's MLflow logger (None elsewhere); it skips the steps the run has logged already.

    After a restart, the steps between the checkpoint and the failure are in MLflow already (all
    of them when a killed driver left no checkpoint that Ray Train had registered).
    """
    if rank != 0 or run_id is None:
        return None
    # deferred: mlflow takes seconds to import, and only rank 0 logs
    from pipeline.tracking import RunLogger, last_logged_steps

    uri = config.tracking.uri
    return RunLogger(uri, run_id, resume_from_step=last_logged_steps(uri, run_id))


def start_utilisation(
    config: RunConfig,
    plan: Plan,
    model: torch.nn.Module,
    device: torch.device,
    rank: int,
    run_id: str | None,
) -> Utilisation | None:
    """Rank 0's FLOPs per training image and device peak for ``train/mfu`` (None elsewhere).

    The peak is said on the console and stored as MLflow params on the run's first start
    (MLflow params cannot change, and a resumed run measures a CPU's peak again: the first
    start's figures stay, the console line says the current one).
    """
    if rank != 0:
        return None
    result = utilisation(
        model, plan.train_resolution, device, plan.precision, config.scaling.peak_tflops
    )
    _record(config, run_id, result)
    return result


def _record(config: RunConfig, run_id: str | None, result: Utilisation) -> None:
    params = result.params()
    log.info(
        f"MFU: {params['mfu.train_gflops_per_image']} GFLOP per training image (forward and "
        f"backward); peak {params['mfu.peak_tflops']} TFLOP/s per worker: "
        f"{params['mfu.peak_source']}"
    )
    if run_id is None:
        return
    # deferred: mlflow takes seconds to import, and only rank 0 logs
    from pipeline.tracking.client import call_mlflow, client

    try:
        mlflow = client(config.tracking.uri)
        logged = call_mlflow(partial(mlflow.get_run, run_id), "get_run", 3, 0.5).data.params
        for key, value in params.items():
            if key not in logged:
                call_mlflow(partial(mlflow.log_param, run_id, key, value), "log_param", 3, 0.5)
    except Exception as exc:  # a tracking outage costs the params, never the run
        log.warning(f"MFU params not logged to MLflow run {run_id}: {exc}")
