"""``python -m pipeline.demo`` (what ``make demo`` runs): the whole mission on one laptop.

1. ``shapes`` shards for pretraining and ``digits`` shards for finetuning, on the local disk;
2. a Ray head on 127.0.0.1 with token authentication: the token is where Ray looks for it
   (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, generated there on
   first use); ``RAY_AUTH_MODE=disabled`` turns it off;
3. the pretraining run submitted as a Ray job (``configs/demo.yaml``);
4. the scheduler finetuning every checkpoint milestone on the tasks in ``jobs/finetune``, and a
   scratch baseline job;
5. the comparison's plots and table; a summary of finetuned against scratch.
Everything lands in ``demo_out/``; running it again reuses what is already finished.
Exit codes: 0 done, 1 a demo job failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from pipeline import cli
from pipeline.run import ROOT
from pipeline.run.demo import (
    EXPERIMENT,
    DemoError,
    ray_head,
    run_jobs,
    summary,
    tracking_uri,
    write_shards,
)
from pipeline.run.ray_cluster import local_ray_env

log = logging.getLogger("pipeline.demo")  # __name__ is __main__ under python -m


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The demo's command line."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "demo_out")
    parser.add_argument("--samples", type=int, default=8000, help="shapes images to write")
    parser.add_argument("--every", type=int, default=500, help="finetune every N pretrain steps")
    cli.add_verbosity(parser)
    return parser.parse_args(argv)


def demo(args: argparse.Namespace) -> int:
    """Shards, Ray head, jobs, scheduler; then the comparison and the summary."""
    # deferred: the analysis package imports matplotlib
    from pipeline.analysis import CompareError, compare_experiment

    out = args.out.resolve()
    started = time.monotonic()
    env = local_ray_env()
    os.environ.update(env)
    shapes, digits = write_shards(out, args.samples)
    try:
        with ray_head(env):
            run_id = run_jobs(out, shapes, digits, args.every)
    except DemoError as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        compare_experiment(tracking_uri(out), EXPERIMENT, out / "plots")
    except CompareError as exc:  # the summary below still holds
        print(f"error: {exc}", file=sys.stderr)
    log.info(summary(out, run_id, (time.monotonic() - started) / 60))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipeline.demo``."""
    return cli.main(argv, parse_args, demo)


if __name__ == "__main__":
    cli.finish(main())
