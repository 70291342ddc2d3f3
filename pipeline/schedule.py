"""``python -m pipeline.schedule --pretrain-run RUN_ID --jobs jobs/finetune [--once]``.

Watches a pretraining run in MLflow. For each checkpoint milestone (every ``--every`` steps, and
the final checkpoint) it submits one ``pipeline.finetune`` Ray job per downstream task, through
Ray's job submission API (what ``ray job submit`` uses), at most ``--max-running`` at a time,
retrying a failed job up to ``--retries`` times. It keeps no state of its own: each job's
submission id is derived from (run, step, task, attempt), so the Ray cluster itself says what
was submitted and how it went, and a finished finetune run in MLflow counts as done. A
restarted scheduler therefore never submits a (checkpoint, task) pair twice.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.config import EXIT_BAD_INPUT, ConfigError, parse_override

_SHELL = re.compile(r"[;&|`$<>\\\n'\"]")
_SAFE_OVERRIDE = re.compile(r"^[a-z_]+(\.[a-z_]+)+=[\w.:/@,+\-=]*$")
FINISHED_RAY = {"SUCCEEDED"}
FAILED_RAY = {"FAILED", "STOPPED"}
ENDED_MLFLOW = {"FINISHED", "FAILED", "KILLED"}


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
    tasks = []
    for file in files:
        try:
            tasks.append(TaskSpec.model_validate(yaml.safe_load(file.read_text()) or {}))
        except ValidationError as exc:
            where = "; ".join(f"'{'.'.join(map(str, e['loc']))}': {e['msg']}" for e in exc.errors())
            raise ConfigError(f"{file}: {where}") from None
        for text in tasks[-1].overrides:
            parse_override(text)
    return tasks


@dataclass
class Pair:
    """One (checkpoint step, task) and what Ray and MLflow say about it."""

    step: int
    task: TaskSpec
    attempts: list[str] = field(default_factory=list)  # Ray statuses, oldest first
    done_in_mlflow: bool = False

    @property
    def state(self) -> str:
        if self.done_in_mlflow or (self.attempts and self.attempts[-1] in FINISHED_RAY):
            return "SUCCEEDED"
        return self.attempts[-1] if self.attempts else "WAITING"


def _forwarded_env() -> dict[str, str]:
    return {key: os.environ[key] for key in ("DS_ACCELERATOR",) if key in os.environ}


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

    def __init__(self, args: argparse.Namespace, tasks: list[TaskSpec]):
        from mlflow import MlflowClient
        from ray.job_submission import JobSubmissionClient

        self.args, self.tasks = args, tasks
        self.mlflow = MlflowClient(args.tracking_uri)
        self.ray = JobSubmissionClient(args.ray_address)
        self.run = self.mlflow.get_run(args.pretrain_run)
        self.model_name = self.run.data.params.get("model.name")

    def milestones(self) -> tuple[list[tuple[int, str]], bool]:
        """Checkpoint milestones so far, and whether the pretraining run has ended."""
        from pipeline.tracking import list_checkpoints

        run = self.mlflow.get_run(self.args.pretrain_run)
        ended = run.info.status in ENDED_MLFLOW
        checkpoints = sorted(list_checkpoints(self.args.tracking_uri, self.args.pretrain_run))
        final = checkpoints[-1][0] if ended and checkpoints else None
        chosen = [(s, u) for s, u in checkpoints if s % self.args.every == 0 or s == final]
        return chosen, ended

    def pairs(self, steps: list[int]) -> list[Pair]:
        """The state of every (step, task) pair, read back from Ray and MLflow."""
        jobs = {job.submission_id: str(job.status) for job in self.ray.list_jobs()}
        finished = self._finished_in_mlflow()
        pairs = []
        for step in steps:
            for task in self.tasks:
                pair = Pair(step, task, done_in_mlflow=(step, task.name) in finished)
                while (sid := self._id(pair, len(pair.attempts))) in jobs:
                    pair.attempts.append(jobs[sid].split(".")[-1])
                pairs.append(pair)
        return pairs

    def _id(self, pair: Pair, attempt: int) -> str:
        return submission_id(self.args.pretrain_run, pair.step, pair.task.name, attempt)

    def _finished_in_mlflow(self) -> set[tuple[int, str]]:
        from pipeline.tracking import TAG_PRETRAIN_RUN, TAG_PRETRAIN_STEP, TAG_TASK

        runs = self.mlflow.search_runs(
            [self.run.info.experiment_id],
            filter_string=f"tags.`{TAG_PRETRAIN_RUN}` = '{self.args.pretrain_run}' "
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
            pair.task, self.args.pretrain_run, pair.step, self.args.tracking_uri, experiment,
            self.model_name,
        )  # fmt: skip
        self.ray.submit_job(
            entrypoint=shlex.join(argv),
            submission_id=self._id(pair, attempt),
            entrypoint_num_cpus=pair.task.num_cpus,
            # Pass the scheduler's accelerator choice on only when it made one (GPU clusters
            # let DeepSpeed detect CUDA).
            runtime_env={"env_vars": _forwarded_env()},
            metadata={"pretrain_run": self.args.pretrain_run, "step": str(pair.step),
                      "task": pair.task.name, "attempt": str(attempt)},
        )  # fmt: skip
        pair.attempts.append("PENDING")

    def tick(self) -> tuple[list[Pair], bool]:
        """One pass: read state, submit what is due; return the pairs and whether all is done."""
        milestones, ended = self.milestones()
        pairs = self.pairs([step for step, _ in milestones])
        running = sum(pair.state in {"PENDING", "RUNNING"} for pair in pairs)
        for pair in pairs:
            retryable = pair.state in FAILED_RAY and len(pair.attempts) <= self.args.retries
            if running < self.args.max_running and (pair.state == "WAITING" or retryable):
                try:
                    self.submit(pair)
                except RuntimeError as exc:  # the job server is not ready: try again next pass
                    print(f"warning: could not submit step {pair.step} {pair.task.name}: {exc}")
                    continue
                running += 1
        retries = self.args.retries
        settled = all(
            p.state == "SUCCEEDED" or (p.state in FAILED_RAY and len(p.attempts) > retries)
            for p in pairs
        )
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The scheduler's command line."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.schedule", description=__doc__)
    parser.add_argument("--pretrain-run", required=True, help="MLflow run id of the pretraining")
    parser.add_argument("--jobs", required=True, help="folder of task specs (jobs/finetune)")
    parser.add_argument("--once", action="store_true", help="one pass, then exit")
    parser.add_argument("--every", type=int, default=1, help="milestone every N steps")
    parser.add_argument("--max-running", type=int, default=1, help="jobs at a time (K)")
    parser.add_argument("--retries", type=int, default=1, help="retries of a failed job (R)")
    parser.add_argument("--poll", type=float, default=5.0, help="seconds between passes")
    parser.add_argument(
        "--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    )
    parser.add_argument(
        "--ray-address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265")
    )
    args = parser.parse_args(argv)
    for name in ("every", "max_running"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipeline.schedule``."""
    args = parse_args(argv)
    try:
        tasks = load_tasks(args.jobs)
        scheduler = Scheduler(args, tasks)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # MLflow's and Ray's clients raise their own exception types
        print(f"error: cannot reach run {args.pretrain_run} or Ray at {args.ray_address}: {exc}",
              file=sys.stderr)  # fmt: skip
        return EXIT_BAD_INPUT
    live, shown = sys.stdout.isatty(), ""
    while True:
        pairs, done = scheduler.tick()
        table = render(pairs, done, args.pretrain_run)
        if live or table != shown:  # a terminal redraws in place; a log gets each change once
            print(("\033[H\033[J" if live else "") + table, flush=True)
            shown = table
        if done or args.once:
            failed = [p for p in pairs if p.state != "SUCCEEDED"]
            return 1 if done and failed else 0
        time.sleep(args.poll)


if __name__ == "__main__":
    sys.exit(main())
