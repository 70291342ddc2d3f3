"""The training plan: every figure a run follows, resolved once from the config.

The config leaves recipe fields at ``None`` to mean "the default"; this module is where each
``None`` meets its one source of truth (the variant table, the optimizer recipe, the dataset's
``_info.json``) and where the scaling arithmetic (global = micro × accumulation × workers) is
done. The driver prints it for ``--dry-run`` and hands it to every worker.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from pipeline.config import ConfigError, RunConfig
from pipeline.models import get_variant, list_models
from pipeline.optim import base_learning_rate, default_clipping

PAPER_BATCH = 4096  # DM experiment_nfnets.py: the batch the paper's λ = 0.01 was tuned at


@dataclass(frozen=True)
class Plan:
    """Resolved figures of a run (all plain values, so it travels to Ray workers as is)."""

    model: str
    num_classes: int
    drop_rate: float
    stochdepth_rate: float
    padding: str
    train_resolution: int
    test_resolution: int
    randaugment_layers: int
    randaugment_magnitude: int
    global_batch: int
    micro_batch: int
    accumulation_steps: int
    num_workers: int
    train_streams: int  # canonical data streams (pipeline.data.streams): fixed for the run
    peak_lr: float
    clipping: float | None
    train_samples: int
    val_samples: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    precision: str
    channels_last: bool

    def as_dict(self) -> dict[str, Any]:
        """The plan as a plain dict (for printing and logging)."""
        return asdict(self)


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def make_plan(config: RunConfig, num_classes: int, train_samples: int, val_samples: int) -> Plan:
    """Resolve the config against the variant table, the recipe and the dataset's size."""
    if config.model.name not in list_models():
        raise ConfigError(
            f"model.name: unknown model {config.model.name!r}; choose one of {list_models()}"
        )
    variant = get_variant(config.model.name)
    train, optim, scaling = config.train, config.optim, config.scaling
    train_samples = _pick(config.data.train_samples, train_samples)
    if train_samples <= 0:
        raise ConfigError(f"data.train_url: {config.data.train_url} holds no training samples")
    steps_per_epoch = max(1, train_samples // train.global_batch)
    total_steps = train.steps or max(
        1, math.ceil(train.epochs * train_samples / train.global_batch)
    )
    clipping = None
    if optim.use_agc and optim.clipping is None and train.global_batch > PAPER_BATCH:
        raise ConfigError(
            f"optim.clipping: no AGC λ is documented for global batch {train.global_batch} "
            f"(the paper's largest is {PAPER_BATCH}, with λ = 0.01); set optim.clipping "
            "explicitly (smaller is safer at larger batch)"
        )
    if optim.use_agc:
        clipping = _pick(optim.clipping, default_clipping(train.global_batch))
    micro_batches = train.global_batch // train.micro_batch
    streams = _pick(config.data.streams, micro_batches)
    if streams % micro_batches:
        raise ConfigError(
            f"data.streams: {streams} is not a multiple of train.global_batch / "
            f"train.micro_batch = {micro_batches} (each stream makes whole micro-batches)"
        )
    gpu = scaling.use_gpu
    precision = train.precision if train.precision != "auto" else ("bf16" if gpu else "fp32")
    return Plan(
        model=config.model.name,
        num_classes=_pick(config.model.num_classes, num_classes),
        drop_rate=_pick(config.model.drop_rate, variant.drop_rate),
        stochdepth_rate=_pick(config.model.stochdepth_rate, variant.stochdepth_rate),
        padding=_pick(config.model.padding, variant.padding),
        train_resolution=_pick(config.data.train_resolution, variant.train_resolution),
        test_resolution=_pick(config.data.test_resolution, variant.test_resolution),
        randaugment_layers=_pick(config.data.randaugment_layers, variant.randaugment_layers),
        randaugment_magnitude=_pick(
            config.data.randaugment_magnitude, variant.randaugment_magnitude
        ),
        global_batch=train.global_batch,
        micro_batch=train.micro_batch,
        accumulation_steps=config.accumulation_steps,
        num_workers=scaling.max_workers,
        train_streams=streams,
        peak_lr=_pick(optim.lr, base_learning_rate(train.global_batch, optim.lr_per_256)),
        clipping=clipping,
        train_samples=train_samples,
        val_samples=val_samples,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        # A run shorter than the warm-up (a smoke test) warms up over all of it.
        warmup_steps=min(
            total_steps, round(optim.warmup_epochs * train_samples / train.global_batch)
        ),
        precision=precision,
        channels_last=_pick(train.channels_last, True),
    )


def on_workers(plan: Plan, workers: int) -> Plan:
    """The plan of a run that Ray Train started on ``workers`` workers (an elastic run's count
    changes from start to start): the same global batch, micro-batch, streams, lr and λ, with
    the accumulation re-derived."""
    if workers == plan.num_workers:
        return plan
    micro_batches = plan.global_batch // plan.micro_batch
    if micro_batches % workers:  # data.streams is a multiple of micro_batches (make_plan)
        raise ConfigError(
            f"scaling.num_workers: {workers} workers cannot share train.global_batch / "
            f"train.micro_batch = {micro_batches} micro-batches evenly"
        )
    return replace(plan, num_workers=workers, accumulation_steps=micro_batches // workers)


def deepspeed_config(config: RunConfig, plan: Plan) -> dict[str, Any]:
    """The DeepSpeed config generated from the run config.

    AGC is the only clip: DeepSpeed's ``gradient_clipping`` defaults to 1.0 and would clip the
    global norm on top of AGC, so it is set to 0. Mixed precision is torch autocast in the
    trainer (fp32 master weights and fp32 gradients, as AGC needs), so DeepSpeed's own
    fp16/bf16 engines stay off.
    """
    if config.train.zero_stage != 0 and plan.clipping is not None:
        raise ConfigError(
            f"train.zero_stage={config.train.zero_stage}: ZeRO stages 1 and 2 hand the optimizer "
            "flat gradient partitions, and AGC needs each parameter's whole, averaged gradient "
            "(the paper clips the global batch's gradient per unit). Use train.zero_stage=0, or "
            "turn AGC off with optim.use_agc=false."
        )
    return {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation_steps,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": config.train.zero_stage},
        "steps_per_print": 10**9,
        # DeepSpeed's throughput timer synchronises the device at every micro-step; the Trainer
        # times its own steps.
        "timers": {"throughput": {"enabled": False}},
    }


# What a resumed run keeps (by the config key that sets it): its global batch and how the batch
# is cut into micro-batches and streams, and so the lr and AGC's λ. Only scaling.num_workers, and
# with it the accumulation, may change (pipeline.data.streams keeps the data the same).
RESUME_KEEPS = {
    "global_batch": "train.global_batch",
    "micro_batch": "train.micro_batch",
    "train_streams": "data.streams",
    "peak_lr": "optim.lr",
    "clipping": "optim.clipping",
}


def resume_conflict(saved: dict[str, Any], plan: Plan) -> str | None:
    """Why a run of ``plan`` cannot resume from a checkpoint of the plan ``saved``; None: it can."""
    current = plan.as_dict()
    changed = [
        f"{key}={saved[field]} (this run: {current[field]})"
        for field, key in RESUME_KEEPS.items()
        if field in saved and saved[field] != current[field]
    ]
    if not changed:
        return None
    return (
        f"the checkpoint was trained with {', '.join(changed)}; a resumed run keeps its global "
        "batch, micro-batch, streams, lr and AGC λ, and only scaling.num_workers may change (to "
        f"a divisor of train.global_batch / train.micro_batch = "
        f"{saved.get('global_batch', 0) // saved.get('micro_batch', 1)})"
    )


def check_resumed_plan(saved: dict[str, Any], plan: Plan) -> str:
    """Raise ConfigError unless ``plan`` may resume from a checkpoint of the plan ``saved``;
    return how the split of the global batch changed (``""`` if it did not), for the log."""
    conflict = resume_conflict(saved, plan)
    if conflict:
        raise ConfigError(conflict)
    before = (saved.get("num_workers"), saved.get("accumulation_steps"))
    if before in ((plan.num_workers, plan.accumulation_steps), (None, None)):
        return ""
    return (
        f" on {plan.num_workers} workers x {plan.accumulation_steps} micro-batches each "
        f"(written on {before[0]} x {before[1]})"
    )
