"""The Trainer: one NFNet, one DeepSpeed engine, SGD with AGC, on every Ray Train worker.

``train()`` reads top to bottom: build, restore, then one loop of step → EMA → log → evaluate →
checkpoint. AGC runs inside the client optimizer, which DeepSpeed calls once per optimizer step
at the accumulation boundary, after it has all-reduced (averaged) the accumulated gradients:
the clip sees the gradient of the whole global batch, as in the paper.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pipeline.config import RunConfig
from pipeline.models import create_model
from pipeline.optim import (
    SGD_AGC,
    ModelEma,
    lr_at,
    mixup_cutmix,
    param_groups,
    soft_target_cross_entropy,
)
from pipeline.train import checkpoint as ckpt
from pipeline.train.batches import SYNTHETIC, ShardBatches, SyntheticBatches
from pipeline.train.nonfinite import NonfiniteStepError, NonfiniteSteps
from pipeline.train.plan import Plan, deepspeed_config


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, step, micro-batch …), stable across processes."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class StepStats:
    """Running sums between two log lines (kept as tensors/floats, no per-step sync)."""

    loss: list[torch.Tensor] = field(default_factory=list)
    correct: list[torch.Tensor] = field(default_factory=list)
    clip_fraction: list[torch.Tensor] = field(default_factory=list)
    grad_norm: list[torch.Tensor] = field(default_factory=list)
    samples: int = 0
    step_time: float = 0.0
    data_time: float = 0.0
    allreduce_time: float = 0.0

    def summary(self, workers: int) -> dict[str, float]:
        """Averages since the last log line, as MLflow metrics."""
        mean = lambda values: (  # noqa: E731 (nan when every step was skipped)
            torch.stack(values).float().mean().item() if values else math.nan
        )
        images_per_s = self.samples * workers / max(self.step_time, 1e-9)
        metrics = {
            "train/loss": mean(self.loss),
            "train/top1": float(sum(self.correct)) / self.samples if self.samples else math.nan,
            "train/images_per_s": images_per_s,
            "train/images_per_s_per_worker": images_per_s / workers,
            "train/data_wait_fraction": self.data_time / max(self.step_time, 1e-9),
        }
        if self.allreduce_time:
            metrics["train/allreduce_fraction"] = self.allreduce_time / max(self.step_time, 1e-9)
        if self.clip_fraction:
            metrics["train/agc_clip_fraction"] = mean(self.clip_fraction)
            metrics["train/grad_norm"] = mean(self.grad_norm)
        return metrics


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
        self.init = init
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.device = torch.device("cpu")
        self.logger = None
        train = config.train
        self.nonfinite = NonfiniteSteps(train.nonfinite, train.max_nonfinite_in_a_row)
        self.stats = StepStats()

    def train(self) -> dict[str, float]:
        """Run the whole plan (or what is left of it after a restore) and return final metrics."""
        plan = self.plan
        self.model = self.build_model()
        self.engine, self.optimizer = self.build_engine(self.model)
        self.ema = ModelEma(self.model, decay=self.config.optim.ema_decay)
        self.batches = self.build_batches()
        self.step = self.restore()
        self.logger = self.open_logger()
        stats, last_metrics = self.stats, {}
        steps = self.batches.steps(self.step)
        started = time.perf_counter()
        while self.step < plan.total_steps:
            tick = time.perf_counter()
            micro_batches = next(steps)
            waited = time.perf_counter() - tick
            skipped = self.train_step(micro_batches, stats)
            if not skipped:  # a skipped step leaves the EMA as it leaves the weights
                self.ema.update(self.model, self.step)
            self.step += 1
            self.count_nonfinite(skipped)
            stats.step_time += time.perf_counter() - tick
            stats.data_time += waited
            if self.step % self.config.train.log_every == 0 or self.step == plan.total_steps:
                last_metrics = self.log(stats, started)
                stats = self.stats = StepStats()
            if self.step % self.config.train.eval_every == 0 or self.step == plan.total_steps:
                last_metrics |= self.log_eval(self.evaluate())
            stopping = self.step == self.config.train.stop_after
            if (
                stopping
                or self.step % self.config.checkpoint.every_steps == 0
                or (self.step == plan.total_steps)
            ):
                self.save_checkpoint(last_metrics)
            if stopping:
                return self.leave_early()
        self.finish()
        return last_metrics

    # --- building ---------------------------------------------------------------------------

    def build_model(self) -> torch.nn.Module:
        """The NFNet of the plan; finetuning starts it from given weights with a new head."""
        plan = self.plan
        torch.manual_seed(self.config.train.seed)  # the same initial weights on every run
        model = create_model(
            plan.model,
            num_classes=plan.num_classes,
            drop_rate=plan.drop_rate,
            stochdepth_rate=plan.stochdepth_rate,
            padding=plan.padding,
            numerics=self.config.model.numerics,
        )
        if self.init is not None:
            ckpt.load_backbone(model, ckpt.fetch_weights(self.init, self.config))
        if self.config.scaling.use_gpu:
            self.device = torch.device("cuda", torch.cuda.current_device())
            model = model.to(self.device)
        if plan.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def build_engine(self, model: torch.nn.Module):
        """DeepSpeed around the model, with SGD+AGC as the client optimizer."""
        import deepspeed

        optim, plan = self.config.optim, self.plan
        groups = param_groups(model, weight_decay=optim.weight_decay, clipping=plan.clipping)
        optimizer = SGD_AGC(
            groups,
            lr=0.0,
            momentum=optim.momentum,
            nesterov=optim.nesterov,
            clipping=plan.clipping,
            eps=optim.agc_eps,
            skip_nonfinite=True,  # train.nonfinite: never apply a NaN/Inf gradient
        )
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=deepspeed_config(self.config, plan),
            dist_init_required=False,
        )
        if self.config.train.time_allreduce:
            self.time_allreduce(engine)
        return engine, optimizer

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

    def build_batches(self):
        """The micro-batch source named by ``data.train_url``."""
        data = self.config.data
        if data.train_url.startswith(SYNTHETIC):
            return SyntheticBatches(data.train_url, self.plan, self.rank)
        return ShardBatches(
            data.train_url,
            data.val_url,
            self.plan,
            self.rank,
            seed=self.config.train.seed,
            loader_workers=data.loader_workers,
            shuffle_buffer=data.shuffle_buffer,
            crop_min_area=data.crop_min_area,
            storage_options=data.storage_options,
            allow_pipe=data.allow_pipe,
            pin_memory=self.config.scaling.use_gpu,
        )

    # --- the step ---------------------------------------------------------------------------

    def train_step(self, micro_batches, stats: StepStats) -> bool:
        """Forward/backward every micro-batch; DeepSpeed steps SGD_AGC at the boundary.

        Returns whether the optimizer skipped the update (a NaN/Inf gradient).
        """
        plan, seed = self.plan, self.config.train.seed
        losses, correct = [], []
        lr = lr_at(self.step, plan.total_steps, plan.warmup_steps, plan.peak_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for slot, (images, labels) in enumerate(micro_batches):
            # The global micro-batch index makes mixing, dropout and stochastic depth identical
            # however the global batch is split over workers and accumulation slots.
            global_micro = slot * plan.num_workers + self.rank
            images, labels = images.to(self.device), labels.to(self.device)
            generator = torch.Generator().manual_seed(sample_seed(seed, self.step, global_micro))
            mixed, targets = mixup_cutmix(
                images,
                labels,
                plan.num_classes,
                generator=generator,
                mixup_alpha=self.config.data.mixup_alpha,
                cutmix=self.config.data.cutmix,
                label_smoothing=self.config.optim.label_smoothing,
            )
            if plan.channels_last:
                mixed = mixed.contiguous(memory_format=torch.channels_last)
            torch.manual_seed(sample_seed(seed, self.step, global_micro, 1))
            with torch.autocast(self.device.type, torch.bfloat16, plan.precision == "bf16"):
                logits = self.engine(mixed)
            loss = soft_target_cross_entropy(logits.float(), targets)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach())
            correct.append((logits.argmax(1) == labels).sum().detach())
        if getattr(self.optimizer, "last_step_skipped", False):
            return True  # its NaN would spoil the averages of the whole log line
        stats.loss += losses
        stats.correct += correct
        stats.samples += sum(labels.numel() for _, labels in micro_batches)
        last = getattr(self.optimizer, "last_stats", None)
        if last:
            stats.clip_fraction.append(last["clip_fraction"].detach())
            stats.grad_norm.append(last["grad_norm"].detach())
        return False

    def count_nonfinite(self, skipped: bool) -> None:
        """Count a skipped step (``train.nonfinite``); log the count before stopping."""
        if skipped and self.rank == 0:
            print(f"step {self.step}: NaN/Inf gradient, update skipped", flush=True)
        try:
            self.nonfinite.record(self.step, skipped)
        except NonfiniteStepError:
            if self.logger is not None:
                count = {"train/nonfinite_steps": float(self.nonfinite.total)}
                self.logger.log_metrics(count, step=self.step)
                self.logger.close()
            raise

    # --- evaluation -------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Top-1/top-5 of the raw and EMA weights on the validation split, over all workers."""
        results = {}
        for suffix, model in (("", self.model), ("_ema", self.ema.module)):
            model.eval()
            totals = torch.zeros(3, dtype=torch.float64)
            limit = self.config.train.eval_batches
            for index, (images, labels) in enumerate(self.batches.eval_batches()):
                if limit is not None and index >= limit:
                    break
                images, labels = images.to(self.device), labels.to(self.device)
                with torch.autocast(
                    self.device.type, torch.bfloat16, self.plan.precision == "bf16"
                ):
                    logits = model(images).float()
                top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
                totals += torch.tensor(
                    [
                        (top5[:, 0] == labels).sum().item(),
                        (top5 == labels[:, None]).any(1).sum().item(),
                        labels.numel(),
                    ],
                    dtype=torch.float64,
                )
            model.train()
            if dist.is_initialized():
                dist.all_reduce(totals)
            count = max(totals[2].item(), 1.0)
            results[f"val/top1{suffix}"] = totals[0].item() / count
            results[f"val/top5{suffix}"] = totals[1].item() / count
        return results

    # --- logging ----------------------------------------------------------------------------

    def open_logger(self):
        """The rank-0 MLflow logger; after a restore it skips steps the run already logged."""
        if self.rank != 0 or self.run_id is None:
            return None
        from pipeline.tracking import RunLogger, last_logged_steps

        uri = self.config.tracking.uri
        # After a restart, steps between the checkpoint and the failure were logged already
        # (all of them when a killed driver left no checkpoint Ray Train had registered).
        logged = last_logged_steps(uri, self.run_id)
        return RunLogger(uri, self.run_id, resume_from_step=logged)

    def log(self, stats: StepStats, started: float) -> dict[str, float]:
        """One progress line and one batch of metrics, on rank 0 only."""
        if self.rank != 0:
            return {}
        metrics = stats.summary(self.plan.num_workers)
        metrics["train/lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["data/skipped_samples"] = float(self.batches.skipped)
        metrics["train/nonfinite_steps"] = float(self.nonfinite.total)
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=self.step)
        elapsed = time.perf_counter() - started
        remaining = self.plan.total_steps - self.step
        eta = elapsed / max(self.step - self._first_step, 1) * remaining
        print(
            f"step {self.step}/{self.plan.total_steps}  loss {metrics['train/loss']:.4f}  "
            f"top1 {metrics['train/top1']:.3f}  {metrics['train/images_per_s']:.1f} img/s  "
            f"ETA {_duration(eta)}",
            flush=True,
        )
        return metrics

    def log_eval(self, metrics: dict[str, float]) -> dict[str, float]:
        """Validation metrics to MLflow and the console (rank 0)."""
        if self.rank == 0:
            if self.logger is not None:
                self.logger.log_metrics(metrics, step=self.step)
            shown = "  ".join(f"{key} {value:.4f}" for key, value in metrics.items())
            print(f"eval @ step {self.step}: {shown}", flush=True)
        return metrics

    # --- checkpoints ------------------------------------------------------------------------

    def restore(self) -> int:
        """Continue from Ray Train's latest checkpoint, if there is one; return the step."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        self._first_step = 0
        if checkpoint is None:
            return 0
        with checkpoint.as_directory() as directory:
            state = ckpt.load(directory, self.model, self.optimizer, self.ema)
        if state.get("run_id") not in (None, self.run_id):
            raise RuntimeError(
                f"checkpoint belongs to MLflow run {state['run_id']}, not {self.run_id}"
            )
        self._first_step = state["step"]
        self.nonfinite.total = state.get("nonfinite_steps", 0)
        if self.rank == 0:
            print(f"resumed from checkpoint at step {state['step']}", flush=True)
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
        with ckpt.staging_dir() as directory:
            checkpoint = None
            if self.rank == 0:
                ckpt.save(directory, self.model, self.optimizer, self.ema, state)
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            name = f"step_{self.step:09d}"
            url = f"{self.run_url or self.config.checkpoint.storage_url}/{name}"
            ray.train.report(
                report,
                checkpoint=checkpoint,
                checkpoint_dir_name=name,
                checkpoint_upload_fn=ckpt.upload_with_retries(url),
            )
        if self.logger is not None and self.run_url is not None:
            from pipeline.tracking import log_checkpoint_event

            # The milestone the scheduler watches: written after Ray Train has persisted it.
            log_checkpoint_event(self.config.tracking.uri, self.run_id, self.step, url)

    def leave_early(self) -> dict[str, float]:
        """Stop after ``train.stop_after`` (as a preemption would): all is in the checkpoint."""
        if self.logger is not None:
            self.logger.close()
        if self.rank == 0:
            print(f"stopped after step {self.step} (train.stop_after); run again to resume")
        return {"stopped_at": float(self.step)}

    def finish(self) -> None:
        """Final weights to MLflow (safetensors) and an optional registered model version."""
        if self.logger is None:
            return
        from pipeline.tracking import log_safetensors_weights, register_model

        self.logger.flush()
        uri = self.config.tracking.uri
        artifact = "weights/model.safetensors"
        log_safetensors_weights(uri, self.run_id, self.final_state(), artifact_path=artifact)
        if self.config.tracking.registered_model:
            register_model(uri, self.run_id, artifact, self.config.tracking.registered_model)
        self.logger.close()

    def final_state(self) -> dict[str, torch.Tensor]:
        """The final raw weights (the EMA weights stay in the checkpoint)."""
        return {key: value.detach().cpu() for key, value in self.model.state_dict().items()}


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else (f"{seconds // 60}m{seconds % 60:02d}s")
    )


def use_this_environments_build_tools() -> None:
    """Build DeepSpeed's JIT ops with this environment's tools, into this environment's cache.

    On CPU, DeepSpeed compiles its shared-memory comm op on first use (25-35 s), with the
    ``ninja`` first on ``PATH``, into torch's extension cache. A system ninja of another version
    than the one installed with DeepSpeed rejects the other's build log, so each switch between
    the two (a Ray cluster started outside the virtual environment, then one inside it) meant
    a full rebuild at the next run. This interpreter's own ``bin`` goes first on ``PATH``, and
    the cache lives in its environment (``TORCH_EXTENSIONS_DIR`` still overrides).
    """
    own_bin = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if not path.startswith(own_bin + os.pathsep):
        os.environ["PATH"] = own_bin + os.pathsep + path
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def train_loop_per_worker(loop_config: dict) -> None:
    """The function Ray Train runs on every worker."""
    if not loop_config["config"]["scaling"]["use_gpu"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    use_this_environments_build_tools()
    config = RunConfig.model_validate(loop_config["config"])
    plan = Plan(**loop_config["plan"])
    torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
    Trainer(
        config, plan, loop_config["run_id"], loop_config["run_url"], loop_config["init"]
    ).train()
