"""``python -m pipeline.schedule --pretrain-run RUN_ID --jobs jobs/finetune [--once]``.

Watches a pretraining run in MLflow. For each checkpoint milestone (every ``--every`` steps, and
the final checkpoint) it submits one ``pipeline.finetune`` Ray job per downstream task, through
Ray's job submission API (what ``ray job submit`` uses), at most ``--max-running`` at a time,
retrying a failed job up to ``--retries`` times. It keeps no state of its own: each job's
submission id is derived from (run, step, task, attempt), so the Ray cluster itself says what
was submitted and how it went, and a finished finetune run in MLflow counts as done. A
restarted scheduler therefore never submits a (checkpoint, task) pair twice.
Exit codes: 0 all done (or one pass with --once), 1 a job failed for good, 2 bad input.
"""

from __future__ import annotations

import argparse
import os

from pipeline import cli
from pipeline.run.schedule import Policy, open_scheduler, watch


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
        "--ray-address",
        default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
        help="the job server; its token from RAY_AUTH_TOKEN or ~/.ray/auth_token",
    )
    cli.add_verbosity(parser)
    args = parser.parse_args(argv)
    for name in ("every", "max_running"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipeline.schedule``."""
    args = parse_args(argv)
    cli.configure_logging(args)
    policy = Policy(every=args.every, max_running=args.max_running, retries=args.retries)

    def schedule() -> int:
        scheduler = open_scheduler(
            args.pretrain_run, args.jobs, args.tracking_uri, args.ray_address, policy
        )
        return watch(scheduler, args.poll, once=args.once)

    return cli.run(schedule)


if __name__ == "__main__":
    cli.finish(main())
