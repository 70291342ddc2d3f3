"""``python -m pipeline.pretrain --config PATH [--dry-run] [section.key=value ...]``.

What ``ray job submit -- python -m pipeline.pretrain ...`` runs: resolve the config into a plan
and check every URL it names (:mod:`pipeline.run.preflight`), then train on the Ray cluster
(:mod:`pipeline.run.launch`). Exit codes: 0 done, 2 bad input (the key or URL named), 1 a run
that failed.
"""

from __future__ import annotations

import argparse
import logging

from pipeline import cli
from pipeline.run.launch import launch
from pipeline.run.preflight import prepare

log = logging.getLogger("pipeline.pretrain")  # __name__ is __main__ under python -m


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The pretraining command line."""
    return cli.run_config_parser("python -m pipeline.pretrain", __doc__).parse_args(argv)


def pretrain(args: argparse.Namespace) -> int:
    """Check everything, then train (or stop after the checks with ``--dry-run``)."""
    config, plan = prepare(args.config, args.overrides, args.dry_run)
    if args.dry_run:
        log.info("dry run: every check passed; nothing was started")
        return 0
    result = launch(config, plan, kind="pretrain")
    log.info(
        f"pretraining finished: MLflow run {result.run_id}, checkpoint {result.checkpoint_url}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipeline.pretrain``."""
    return cli.main(argv, parse_args, pretrain)


if __name__ == "__main__":
    cli.finish(main())
