"""Finetuning every checkpoint milestone of a pretraining run, as Ray jobs.

The scheduler watches a pretraining run in MLflow. For each checkpoint milestone (every
``every`` steps, and the final checkpoint) it submits one ``pipeline.finetune`` Ray job per
downstream task, through Ray's job submission API (what ``ray job submit`` uses), at most
``max_running`` at a time, retrying a failed job up to ``retries`` times. It keeps no state of its
own: each job's submission id is derived from (run, step, task, attempt), so the Ray cluster
itself says what was submitted and how it went, and a finished finetune run in MLflow counts as
done. A restarted scheduler therefore never submits a (checkpoint, task) pair twice.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.config import ConfigError, load_yaml_model, parse_override
from pipeline.run.ray_cluster import (
    RAY_JOB_FAILED,
    RAY_JOB_SUCCEEDED,
    RayAuthError,
    job_client,
    job_state,
)
from pipeline.tracking import (
    ENDED_MLFLOW,
    TAG_PRETRAIN_RUN,
    TAG_PRETRAIN_STEP,
    TAG_TASK,
    list_checkpoints,
)
from pipeline.tracking.redact import redact_text
from pipeline.tracking.uri import CREDENTIAL_VARIABLES

log = logging.getLogger(__name__)

_SHELL = re.compile(r"[;&|`$<>\\\n'\"]")
_SAFE_OVERRIDE = re.compile(r"^[a-z_]+(\.[a-z_]+)+=[\w.:/@,+\-=]*$")
_CLEAR_SCREEN = "\033[H\033[J"


class TaskSpec(BaseModel):
    """One downstream task (a file in ``jobs/finetune/``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,40}$")
    config: str = Field(description="finetune recipe, e.g. configs/finetune/digits.yaml")
    train_url: str = Field(description="fsspec URL of the task's shards")
    overrides: list[str] = Field(default_factory=list, description="dotted key=value, no shell")
    num_cpus: float = Field(1, gt=0, description="CPUs the job's driver reserves")

    @field_validator("train_url", "config")
    @classmethod
    def _no_shell(cls, value: str) -> str:
        # Arguments travel as one quoted list; shell syntax is refused outright as well.
        if _SHELL.search(value):
            raise ValueError(f"{value!r} contains shell syntax")
        return value

    @field_validator("overrides")
    @classmethod
    def _plain_overrides(cls, values: list[str]) -> list[str]:
        for item in values:
            if not _SAFE_OVERRIDE.match(item):
                raise ValueError(f"override {item!r} is not section.key=value (no shell syntax)")
        return values


def load_tasks(folder: str | Path) -> list[TaskSpec]:
    """Every task spec in ``folder``; a bad file raises ConfigError naming it and the key."""
    files = sorted(Path(folder).glob("*.yaml"))
    if not files:
        raise ConfigError(f"--jobs {folder}: no *.yaml task specs found")
    tasks = [load_yaml_model(file, TaskSpec, "task spec") for file in files]
    for task in tasks:
        for text in task.overrides:
            parse_override(text)
    return tasks


@dataclass(frozen=True)
class Policy:
    """How the scheduler paces its jobs."""

    every: int = 1  # a milestone every N steps (and the final checkpoint)
    max_running: int = 1  # jobs pending or running at a time
    retries: int = 1  # retries of a failed job


@dataclass
class Pair:
    """One (checkpoint step, task) and what Ray and MLflow say about it."""

    step: int
    task: TaskSpec
    attempts: list[str] = field(default_factory=list)  # Ray statuses, oldest first
    done_in_mlflow: bool = False

    @property
    def state(self) -> str:
        if self.done_in_mlflow or (self.attempts and self.attempts[-1] in RAY_JOB_SUCCEEDED):
            return "SUCCEEDED"
        return self.attempts[-1] if self.attempts else "WAITING"


def _forwarded_env() -> dict[str, str]:
    # The scheduler's accelerator choice, only when it made one (GPU clusters let DeepSpeed detect
    # CUDA), and its MLflow credentials: the finetune's driver and workers log with them. A job's
    # runtime environment is readable, like everything on the cluster, only with its token.
    names = ("DS_ACCELERATOR", *CREDENTIAL_VARIABLES)
    return {name: os.environ[name] for name in names if os.environ.get(name)}


def submission_id(run_id: str, step: int, task: str, attempt: int) -> str:
    """The deterministic Ray submission id of one attempt."""
    return f"finetune-{run_id[:12]}-{task}-step{step}-try{attempt}"


def finetune_argv(
    task: TaskSpec,
    run_id: str,
    step: int,
    tracking_uri: str,
    experiment: str,
    model_name: str | None,
) -> list[str]:
    """The finetune command of one (checkpoint, task) pair as an argument list (never a string)."""
    return [
        "python", "-m", "pipeline.finetune",
        "--config", task.config,
        "--from", f"{run_id}@{step}",
        "--task", task.name,
        f"data.train_url={task.train_url}",
        f"tracking.uri={tracking_uri}",
        f"tracking.experiment={experiment}",
        *([f"model.name={model_name}"] if model_name else []),
        *task.overrides,
    ]  # fmt: skip


class Scheduler:
    """Turns checkpoint milestones into finetune Ray jobs."""

    def __init__(
        self,
        pretrain_run: str,
        tasks: list[TaskSpec],
        tracking_uri: str,
        ray_address: str,
        policy: Policy,
    ):
        self.pretrain_run, self.tasks, self.policy = pretrain_run, tasks, policy
        self.tracking_uri = tracking_uri
        self.mlflow = MlflowClient(tracking_uri)
        self.ray = job_client(ray_address)
        self.run = self.mlflow.get_run(pretrain_run)
        self.model_name = self.run.data.params.get("model.name")

    def milestones(self) -> tuple[list[tuple[int, str]], bool]:
        """Checkpoint milestones so far, and whether the pretraining run has ended."""
        run = self.mlflow.get_run(self.pretrain_run)
        ended = run.info.status in ENDED_MLFLOW
        checkpoints = sorted(list_checkpoints(self.tracking_uri, self.pretrain_run))
        final = checkpoints[-1][0] if ended and checkpoints else None
        every = self.policy.every
        chosen = [(s, u) for s, u in checkpoints if s % every == 0 or s == final]
        return chosen, ended

    def pairs(self, steps: list[int]) -> list[Pair]:
        """The state of every (step, task) pair, read back from Ray and MLflow."""
        jobs = {job.submission_id: job_state(job.status) for job in self.ray.list_jobs()}
        finished = self._finished_in_mlflow()
        pairs = []
        for step in steps:
            for task in self.tasks:
                pair = Pair(step, task, done_in_mlflow=(step, task.name) in finished)
                while (sid := self._id(pair, len(pair.attempts))) in jobs:
                    pair.attempts.append(jobs[sid])
                pairs.append(pair)
        return pairs

    def _id(self, pair: Pair, attempt: int) -> str:
        return submission_id(self.pretrain_run, pair.step, pair.task.name, attempt)

    def _finished_in_mlflow(self) -> set[tuple[int, str]]:
        runs = self.mlflow.search_runs(
            [self.run.info.experiment_id],
            filter_string=f"tags.`{TAG_PRETRAIN_RUN}` = '{self.pretrain_run}' "
            "and attributes.status = 'FINISHED'",
        )
        return {
            (int(run.data.tags[TAG_PRETRAIN_STEP]), run.data.tags.get(TAG_TASK, ""))
            for run in runs
            if TAG_PRETRAIN_STEP in run.data.tags
        }

    def submit(self, pair: Pair) -> None:
        """Submit the next attempt of one pair as a Ray job (arguments as one quoted list)."""
        attempt = len(pair.attempts)
        experiment = self.mlflow.get_experiment(self.run.info.experiment_id).name
        argv = finetune_argv(
            pair.task, self.pretrain_run, pair.step, self.tracking_uri, experiment,
            self.model_name,
        )  # fmt: skip
        self.ray.submit_job(
            entrypoint=shlex.join(argv),
            submission_id=self._id(pair, attempt),
            entrypoint_num_cpus=pair.task.num_cpus,
            runtime_env={"env_vars": _forwarded_env()},
            metadata={"pretrain_run": self.pretrain_run, "step": str(pair.step),
                      "task": pair.task.name, "attempt": str(attempt)},
        )  # fmt: skip
        pair.attempts.append("PENDING")

    def _gave_up(self, pair: Pair) -> bool:
        return pair.state in RAY_JOB_FAILED and len(pair.attempts) > self.policy.retries

    def tick(self) -> tuple[list[Pair], bool]:
        """One pass: read state, submit what is due; return the pairs and whether all is done."""
        milestones, ended = self.milestones()
        pairs = self.pairs([step for step, _ in milestones])
        running = sum(pair.state in {"PENDING", "RUNNING"} for pair in pairs)
        for pair in pairs:
            retryable = pair.state in RAY_JOB_FAILED and not self._gave_up(pair)
            if running < self.policy.max_running and (pair.state == "WAITING" or retryable):
                try:
                    self.submit(pair)
                except RuntimeError as exc:  # the job server is not ready: try again next pass
                    log.warning(
                        f"warning: could not submit step {pair.step} {pair.task.name}: "
                        f"{redact_text(str(exc))}"
                    )
                    continue
                running += 1
        settled = all(pair.state == "SUCCEEDED" or self._gave_up(pair) for pair in pairs)
        return pairs, ended and settled


def render(pairs: list[Pair], ended: bool, run_id: str) -> str:
    """The status table: one row per (checkpoint step, task)."""
    lines = [
        f"pretraining run {run_id}: {'ended' if ended else 'running'}",
        f"{'step':>8}  {'task':<16} {'state':<10} attempts",
    ]
    for pair in pairs:
        lines.append(f"{pair.step:>8}  {pair.task.name:<16} {pair.state:<10} {len(pair.attempts)}")
    return "\n".join(lines)


def open_scheduler(
    pretrain_run: str, jobs: str | Path, tracking_uri: str, ray_address: str, policy: Policy
) -> Scheduler:
    """A scheduler for the task specs in ``jobs``; ConfigError for a bad spec or an unreachable
    run or Ray job server."""
    tasks = load_tasks(jobs)
    try:
        return Scheduler(pretrain_run, tasks, tracking_uri, ray_address, policy)
    except RayAuthError as exc:
        raise ConfigError(f"--ray-address: {exc}") from None
    except Exception as exc:  # MLflow's and Ray's clients raise their own exception types
        raise ConfigError(
            f"cannot reach run {pretrain_run} or Ray at {ray_address}: {redact_text(str(exc))}"
        ) from None


def watch(scheduler: Scheduler, poll: float, once: bool = False) -> int:
    """Pass after pass until every pair settled (or one pass with ``once``), logging the table.

    Returns 0 when all succeeded (or after ``once``), 1 when a pair failed for good.
    """
    live, shown = sys.stdout.isatty(), ""
    while True:
        pairs, done = scheduler.tick()
        table = render(pairs, done, scheduler.pretrain_run)
        if live or table != shown:  # a terminal redraws in place; a log gets each change once
            log.info((_CLEAR_SCREEN if live else "") + table)
            shown = table
        if done or once:
            failed = [pair for pair in pairs if pair.state != "SUCCEEDED"]
            return 1 if done and failed else 0
        time.sleep(poll)
