"""The Trainer: one NFNet, one DeepSpeed engine, SGD with AGC, on every Ray Train worker.

``Trainer(...)`` builds every part of the run (model, engine, EMA, batches, the restored
position, the MLflow logger); ``train()`` is one loop of step → log → evaluate → checkpoint.
AGC runs inside the client optimizer, which DeepSpeed calls once per optimizer step at the
accumulation boundary, after it has all-reduced (averaged) the accumulated gradients: the clip
sees the gradient of the whole global batch, as in the paper.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from pipeline.config import RunConfig
from pipeline.models import create_model
from pipeline.optim import (
    SGD_AGC,
    ModelEma,
    lr_at,
    mixed_targets,
    param_groups,
    soft_target_cross_entropy,
)
from pipeline.seeds import sample_seed
from pipeline.train import checkpoint as ckpt
from pipeline.train.batches import MicroBatch, make_batches
from pipeline.train.compiling import compile_model, use_compile
from pipeline.train.evaluate import evaluate
from pipeline.train.metrics import (
    StepStats,
    eval_line,
    open_run_logger,
    progress_line,
    start_utilisation,
)
from pipeline.train.nonfinite import NonfiniteStepError, NonfiniteSteps
from pipeline.train.plan import Plan, check_resumed_plan, deepspeed_config
from pipeline.train.preemption import StepBoundary
from pipeline.train.prefetch import DevicePrefetcher, device_generator, prefetcher, to_device

log = logging.getLogger(__name__)

MicroBatches = list[MicroBatch]


def due(step: int, every: int, total: int) -> bool:
    """Whether something done every ``every`` steps happens at ``step``: always at the last."""
    return step % every == 0 or step == total


class Trainer:
    """Pretrains (or finetunes) one model on one Ray Train worker."""

    def __init__(
        self,
        config: RunConfig,
        plan: Plan,
        run_id: str | None,
        run_url: str | None = None,
        init: dict | None = None,
    ):
        self.config, self.plan, self.run_id, self.run_url = config, plan, run_id, run_url
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.device = torch.device("cpu")
        if config.scaling.use_gpu:
            self.device = torch.device("cuda", torch.cuda.current_device())
        train = config.train
        self.nonfinite = NonfiniteSteps(train.nonfinite, train.max_nonfinite_in_a_row)
        self.stats = StepStats()
        self.feed: DevicePrefetcher | None = None  # the step source, a step ahead on the device
        self.model = self.build_model(init)
        self.optimizer = self.build_optimizer()
        self.engine = self.build_engine()
        self.ema = ModelEma(self.model, decay=config.optim.ema_decay)
        self.batches = make_batches(config, plan, self.rank)
        self.first_step = self.restore()
        self.step = self.first_step
        self.logger = open_run_logger(config, run_id, self.rank)
        self.mfu = start_utilisation(config, plan, self.model, self.device, self.rank, run_id)

    def train(self) -> dict[str, float]:
        """Run what is left of the plan; return the last metrics (or where it stopped)."""
        train, total = self.config.train, self.plan.total_steps
        metrics: dict[str, float] = {}
        steps = self.batches.steps(self.step)
        started = time.perf_counter()
        boundary = StepBoundary(
            self.config, total, self.first_step, self.run_id, self.logger, self.run_url is not None
        )
        with boundary.settling():  # a failure lets the checkpoint under way reach storage
            while self.step < total:
                self.run_step(steps)
                if due(self.step, train.log_every, total):
                    metrics = self.log(started)
                if due(self.step, train.eval_every, total):
                    metrics |= self.log_eval(self.evaluate())
                after = boundary.after(self.step)  # a checkpoint on schedule, stop or notice
                if after.save:
                    self.save_checkpoint(metrics, boundary.uploads, after.wait)
                if after.stop:
                    return self.leave_early()
                boundary.hold(after, self.step)  # a preemption notice: wait for the restart
        self.finish()
        return metrics

    # --- building ---------------------------------------------------------------------------

    def build_model(self, init: dict | None) -> torch.nn.Module:
        """The model of the plan; finetuning starts it from ``init``'s weights with a new head."""
        plan = self.plan
        torch.manual_seed(self.config.train.seed)  # the same initial weights on every run
        model = create_model(
            plan.model,
            num_classes=plan.num_classes,
            channels_last=plan.channels_last,
            numerics=self.config.model.numerics,
            drop_rate=plan.drop_rate,
            stochdepth_rate=plan.stochdepth_rate,
            padding=plan.padding,
        )
        if init is not None:
            ckpt.load_backbone(model, ckpt.fetch_weights(init, self.config))
        # The weights stay contiguous (NCHW) even with channels_last activations: DeepSpeed's
        # start-up broadcast views each parameter as bytes, which needs a unit last stride.
        model = model.to(self.device)
        if use_compile(self.config.train.compile, self.device):
            compile_model(model)  # in place, before DeepSpeed wraps it
        return model

    def build_optimizer(self) -> SGD_AGC:
        """SGD with AGC over the model's parameter groups; DeepSpeed steps it."""
        optim, clipping = self.config.optim, self.plan.clipping
        return SGD_AGC(
            param_groups(self.model, weight_decay=optim.weight_decay, clipping=clipping),
            lr=0.0,
            momentum=optim.momentum,
            nesterov=optim.nesterov,
            clipping=clipping,
            eps=optim.agc_eps,
            skip_nonfinite=True,  # train.nonfinite: never apply a NaN/Inf gradient
        )

    def build_engine(self):
        """DeepSpeed around the model, with the Trainer's SGD_AGC as the client optimizer.

        At ZeRO stage 0 in fp32 (what AGC needs) ``deepspeed.initialize`` hands that same
        optimizer back and steps it; at stages 1 and 2 a wrapper steps it over flat partitions.
        """
        import deepspeed  # deferred: it picks its accelerator (DS_ACCELERATOR) at import

        engine, _, _, _ = deepspeed.initialize(
            model=self.model,
            optimizer=self.optimizer,
            config=deepspeed_config(self.config, self.plan),
            dist_init_required=False,
        )
        if engine.dp_world_size == 1 and self.config.train.zero_stage == 0:
            # One worker has nothing to average, yet DeepSpeed's all-reduce would flatten and
            # copy every gradient at each boundary (7 % of an nfnet_f0 step on 2 CPU cores).
            # ZeRO 1 and 2 keep their reduce: it fills their gradient partitions.
            engine.enable_backward_allreduce = False
        if self.config.train.time_allreduce:
            self.time_allreduce(engine)
        return engine

    def time_allreduce(self, engine) -> None:
        """Time every gradient all-reduce DeepSpeed makes into ``self.stats.allreduce_time``.

        The wall time of the call, so it includes waiting for the slowest worker: the whole
        cost of synchronising data parallelism. On GPUs the device is synchronised around it
        (the collective is asynchronous there), which is why the timing is opt-in.
        """
        inner = engine.allreduce_gradients
        synchronize = torch.cuda.synchronize if self.device.type == "cuda" else lambda: None

        def timed(*args, **kwargs):
            synchronize()
            tick = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                synchronize()
                self.stats.allreduce_time += time.perf_counter() - tick

        engine.allreduce_gradients = timed

    # --- the step ---------------------------------------------------------------------------

    def run_step(self, steps: Iterator[MicroBatches]) -> None:
        """One optimizer step: its micro-batches (copied to the device a step ahead), the EMA,
        the NaN/Inf flags (read at each log line and checkpoint) and the timings."""
        left = self.plan.total_steps - self.step
        self.feed = prefetcher(steps, self.device, self.feed, left)
        tick = time.perf_counter()
        micro_batches = next(self.feed)
        waited = time.perf_counter() - tick
        skipped = self.train_step(micro_batches)
        self.ema.update(self.model, self.step, skipped)  # skipped: the EMA stays, as the weights
        self.step += 1
        self.nonfinite.add(self.step, skipped)
        train, total = self.config.train, self.plan.total_steps
        reads = (train.log_every, self.config.checkpoint.every_steps)
        if self.step == train.stop_after or any(due(self.step, n, total) for n in reads):
            self.count_nonfinite()  # before this step's log line and checkpoint
        self.stats.step_time += time.perf_counter() - tick
        self.stats.data_time += waited

    def train_step(self, micro_batches: MicroBatches) -> torch.Tensor:
        """Forward/backward every micro-batch; DeepSpeed steps SGD_AGC at the boundary.

        The images arrive mixed, augmented and normalised (``pipeline.data.mixing``); their
        labels are mixed and smoothed here, in the loss, as DM's experiment.py does. Returns
        the optimizer's NaN/Inf flag of the step: a 0-d bool tensor on the device, not read.
        """
        plan, seed = self.plan, self.config.train.seed
        smoothing = self.config.optim.label_smoothing  # DM experiment_nfnets.py: 0.1
        losses, correct = [], []
        lr = lr_at(self.step, plan.total_steps, plan.warmup_steps, plan.peak_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        generator = device_generator(self.device)
        for slot, (images, mix) in enumerate(micro_batches):
            # The global micro-batch index makes dropout and stochastic depth identical however
            # the global batch is split over workers and accumulation slots.
            global_micro = slot * plan.num_workers + self.rank
            images, mix = to_device((images, mix), self.device)  # already there when prefetched
            targets = mixed_targets(*mix, plan.num_classes, smoothing)
            generator.manual_seed(sample_seed(seed, self.step, global_micro, 1))
            with torch.autocast(self.device.type, torch.bfloat16, plan.precision == "bf16"):
                logits = self.engine(images)
            loss = soft_target_cross_entropy(logits.float(), targets)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach())
            correct.append((logits.argmax(1) == mix.labels).sum().detach())
        skipped = self.optimizer.last_step_skipped
        samples = sum(mix.labels.numel() for _, mix in micro_batches)
        self.stats.add_step(losses, correct, samples, self.optimizer.last_stats, skipped)
        return skipped

    def count_nonfinite(self) -> None:
        """Read the NaN/Inf flags of the steps since the last read (one host read) and count
        them (``train.nonfinite``); log the count before stopping."""
        try:
            for step, skipped in self.nonfinite.read():
                if skipped and self.rank == 0:
                    log.info(f"step {step}: NaN/Inf gradient, update skipped")
                self.nonfinite.record(step, skipped)
        except NonfiniteStepError as error:
            if self.logger is not None:
                count = {"train/nonfinite_steps": float(self.nonfinite.total)}
                self.logger.log_metrics(count, step=error.step)
                self.logger.close()
            raise

    def evaluate(self) -> dict[str, float]:
        """Top-1/top-5 of the raw and EMA weights on the validation split, over all workers."""
        return evaluate(
            {"": self.model, "_ema": self.ema.module},
            self.batches.eval_batches,
            device=self.device,
            precision=self.config.train.eval_precision,  # DM: fp32 (bf16 only in training)
            limit=self.config.train.eval_batches,
        )

    # --- logging ----------------------------------------------------------------------------

    def log(self, started: float) -> dict[str, float]:
        """One progress line and one batch of metrics on rank 0; start a new sum of stats."""
        stats, self.stats = self.stats, StepStats()
        if self.rank != 0:
            return {}
        metrics = stats.summary(self.plan.num_workers)
        if self.mfu is not None:
            metrics |= self.mfu.metrics(metrics["train/images_per_s_per_worker"])
        metrics |= {
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "data/skipped_samples": float(self.batches.skipped),
            "train/nonfinite_steps": float(self.nonfinite.total),
            "train/world_size": float(self.plan.num_workers),  # an elastic run's changes
        }
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=self.step)
        elapsed, remaining = time.perf_counter() - started, self.plan.total_steps - self.step
        eta = elapsed / max(self.step - self.first_step, 1) * remaining
        log.info(progress_line(self.step, self.plan.total_steps, metrics, eta))
        return metrics

    def log_eval(self, metrics: dict[str, float]) -> dict[str, float]:
        """Validation metrics to MLflow and the console (rank 0)."""
        if self.rank == 0:
            if self.logger is not None:
                self.logger.log_metrics(metrics, step=self.step)
            log.info(eval_line(self.step, metrics))
        return metrics

    # --- checkpoints ------------------------------------------------------------------------

    def restore(self) -> int:
        """Continue from Ray Train's latest checkpoint, if there is one, on any worker count
        that keeps its global batch (the data stays the same); return its step."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return 0
        with checkpoint.as_directory() as directory:
            state = ckpt.load(directory, self.model, self.optimizer, self.ema)
        split = check_resumed_plan(state.get("plan", {}), self.plan)  # raises on a new batch
        if state.get("run_id") not in (None, self.run_id):
            raise RuntimeError(
                f"checkpoint belongs to MLflow run {state['run_id']}, not {self.run_id}"
            )
        self.nonfinite.total = state.get("nonfinite_steps", 0)
        if self.rank == 0:
            log.info(f"resumed from checkpoint at step {state['step']}{split}")
        return state["step"]

    def save_checkpoint(
        self, metrics: dict[str, float], uploads: ckpt.Uploads, wait: bool = False
    ) -> None:
        """Stage model, optimizer, EMA and position at this step boundary (rank 0) and report
        them to Ray Train, which uploads them (in the background under checkpoint.async_upload)
        and makes them the restart point once stored; ``wait``: the step waits for that too."""
        tick = time.perf_counter()
        self.count_nonfinite()  # a notice's checkpoint may fall between reads of the flags
        state = {
            "step": self.step,
            "run_id": self.run_id,
            "plan": self.plan.as_dict(),
            "nonfinite_steps": self.nonfinite.total,
        }
        report = {"step": self.step, **{k: v for k, v in metrics.items() if math.isfinite(v)}}
        name = f"step_{self.step:09d}"
        url = f"{self.run_url or self.config.checkpoint.storage_url}/{name}"
        staged = None
        if self.rank == 0:
            uploads.wait()  # the previous upload first: one staged folder waits at most
            staged = ckpt.stage(self.model, self.optimizer, self.ema, state)
        upload = uploads.report(self.step, report, staged, name, url)
        if wait and upload is not None:
            upload.wait()
        if self.logger is not None:
            blocked = {"checkpoint/step_seconds": time.perf_counter() - tick}
            self.logger.log_metrics(blocked, step=self.step)

    def leave_early(self) -> dict[str, float]:
        """Stop after ``train.stop_after`` (as a preemption would): all is in the checkpoint."""
        if self.logger is not None:
            self.logger.close()
        if self.rank == 0:
            log.info(f"stopped after step {self.step} (train.stop_after); run again to resume")
        return {"stopped_at": float(self.step)}

    def finish(self) -> None:
        """Final raw and EMA weights to MLflow (safetensors); the registered model version, if
        any, holds the EMA weights (the ones DM reports)."""
        if self.logger is None:
            return
        # deferred: mlflow takes seconds to import, and only rank 0 logs
        from pipeline.tracking.artifacts import publish_weights

        self.logger.flush()
        publish_weights(
            self.config.tracking.uri,
            self.run_id,
            {"raw": self.model.state_dict(), "ema": self.ema.module.state_dict()},
            self.config.tracking.registered_model,
        )
        self.logger.close()
