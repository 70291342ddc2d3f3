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
from pipeline.train.plan import Plan, deepspeed_config

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
        while self.step < total:
            self.run_step(steps)
            if due(self.step, train.log_every, total):
                metrics = self.log(started)
            if due(self.step, train.eval_every, total):
                metrics |= self.log_eval(self.evaluate())
            stopping = self.step == train.stop_after
            if stopping or due(self.step, self.config.checkpoint.every_steps, total):
                self.save_checkpoint(metrics)
            if stopping:
                return self.leave_early()
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
        """One optimizer step: its micro-batches, the EMA, the NaN/Inf count and the timings."""
        tick = time.perf_counter()
        micro_batches = next(steps)
        waited = time.perf_counter() - tick
        skipped = self.train_step(micro_batches)
        if not skipped:  # a skipped step leaves the EMA as it leaves the weights
            self.ema.update(self.model, self.step)
        self.step += 1
        self.count_nonfinite(skipped)
        self.stats.step_time += time.perf_counter() - tick
        self.stats.data_time += waited

    def train_step(self, micro_batches: MicroBatches) -> bool:
        """Forward/backward every micro-batch; DeepSpeed steps SGD_AGC at the boundary.

        The images arrive mixed, augmented and normalised (``pipeline.data.mixing``); their
        labels are mixed and smoothed here, in the loss, as DM's experiment.py does. Returns
        whether the optimizer skipped the update (a NaN/Inf gradient).
        """
        plan, seed = self.plan, self.config.train.seed
        smoothing = self.config.optim.label_smoothing  # DM experiment_nfnets.py: 0.1
        losses, correct = [], []
        lr = lr_at(self.step, plan.total_steps, plan.warmup_steps, plan.peak_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for slot, (images, mix) in enumerate(micro_batches):
            # The global micro-batch index makes dropout and stochastic depth identical however
            # the global batch is split over workers and accumulation slots.
            global_micro = slot * plan.num_workers + self.rank
            labels = mix.labels.to(self.device)
            targets = mixed_targets(*mix, plan.num_classes, smoothing).to(self.device)
            torch.manual_seed(sample_seed(seed, self.step, global_micro, 1))
            with torch.autocast(self.device.type, torch.bfloat16, plan.precision == "bf16"):
                logits = self.engine(images.to(self.device))
            loss = soft_target_cross_entropy(logits.float(), targets)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach())
            correct.append((logits.argmax(1) == labels).sum().detach())
        if self.optimizer.last_step_skipped:
            return True  # its NaN would spoil the averages of the whole log line
        self.stats.loss += losses
        self.stats.correct += correct
        self.stats.samples += sum(mix.labels.numel() for _, mix in micro_batches)
        if self.optimizer.last_stats:
            self.stats.clip_fraction.append(self.optimizer.last_stats["clip_fraction"].detach())
            self.stats.grad_norm.append(self.optimizer.last_stats["grad_norm"].detach())
        return False

    def count_nonfinite(self, skipped: bool) -> None:
        """Count a skipped step (``train.nonfinite``); log the count before stopping."""
        if skipped and self.rank == 0:
            log.info(f"step {self.step}: NaN/Inf gradient, update skipped")
        try:
            self.nonfinite.record(self.step, skipped)
        except NonfiniteStepError:
            if self.logger is not None:
                count = {"train/nonfinite_steps": float(self.nonfinite.total)}
                self.logger.log_metrics(count, step=self.step)
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
        """Continue from Ray Train's latest checkpoint, if there is one; return its step."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return 0
        with checkpoint.as_directory() as directory:
            state = ckpt.load(directory, self.model, self.optimizer, self.ema)
        if state.get("run_id") not in (None, self.run_id):
            raise RuntimeError(
                f"checkpoint belongs to MLflow run {state['run_id']}, not {self.run_id}"
            )
        self.nonfinite.total = state.get("nonfinite_steps", 0)
        if self.rank == 0:
            log.info(f"resumed from checkpoint at step {state['step']}")
        return state["step"]

    def save_checkpoint(self, metrics: dict[str, float]) -> None:
        """Write model, optimizer, EMA and position (rank 0) and report them to Ray Train."""
        import ray.train

        state = {
            "step": self.step,
            "run_id": self.run_id,
            "plan": self.plan.as_dict(),
            "nonfinite_steps": self.nonfinite.total,
        }
        report = {"step": self.step, **{k: v for k, v in metrics.items() if math.isfinite(v)}}
        if self.logger is not None:
            self.logger.flush()
        name = f"step_{self.step:09d}"
        url = f"{self.run_url or self.config.checkpoint.storage_url}/{name}"
        with ckpt.staging_dir() as directory:
            checkpoint = None
            if self.rank == 0:
                ckpt.save(directory, self.model, self.optimizer, self.ema, state)
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(
                report,
                checkpoint=checkpoint,
                checkpoint_dir_name=name,
                checkpoint_upload_fn=ckpt.upload_with_retries(url),
            )
        if self.logger is not None and self.run_url is not None:
            # deferred: mlflow takes seconds to import, and only rank 0 logs
            from pipeline.tracking import log_checkpoint_event

            # The milestone the scheduler watches: written after Ray Train has persisted it.
            log_checkpoint_event(self.config.tracking.uri, self.run_id, self.step, url)

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
