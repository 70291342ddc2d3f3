"""``python -m pipeline.finetune --config PATH --from REF [--weights ema|raw] [--task NAME]
[section.key=value ...]``.

REF names the starting weights:
  - an MLflow run id (its latest checkpoint) or ``RUN_ID@STEP`` (the checkpoint of that step),
    also written ``runs:/RUN_ID``;
  - ``models:/NAME/VERSION``, a registered model version;
  - a checkpoint URL (a folder holding ``ema.safetensors`` and ``model.safetensors``: file://,
    s3://, a path);
  - ``scratch``: random initialisation, the baseline.
``--weights`` picks the EMA weights (default: the ones DM reports) or the raw weights. The model
gets a new classifier head sized to the task's classes, then trains with the same Ray/DeepSpeed
machinery as pretraining. The MLflow run records its origin (pretraining run id, checkpoint step
and which weights) and is nested under the pretraining run. The config and the origin are
checked before anything starts (also with ``--dry-run``). Exit codes: 0 done, 2 bad input (the
key, URL or reference named), 1 a run that failed.
"""

from __future__ import annotations

import argparse
import logging

from pipeline import cli
from pipeline.run.launch import launch
from pipeline.run.preflight import prepare
from pipeline.run.references import WEIGHTS, resolve_reference

log = logging.getLogger("pipeline.finetune")  # __name__ is __main__ under python -m


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The finetuning command line."""
    parser = cli.run_config_parser("python -m pipeline.finetune", __doc__)
    parser.add_argument(
        "--from", dest="ref", required=True, help="run id[@step], models:/…, URL, scratch"
    )
    parser.add_argument(
        "--weights", choices=WEIGHTS, default=WEIGHTS[0], help="EMA (default) or raw weights"
    )
    parser.add_argument("--task", default=None, help="task name recorded in MLflow")
    return parser.parse_args(argv)


def finetune(args: argparse.Namespace) -> int:
    """Check the config and the origin, then train (or stop there with ``--dry-run``)."""
    config, plan = prepare(args.config, args.overrides, args.dry_run)
    origin = resolve_reference(
        args.ref, config.tracking.uri, config.checkpoint.storage_options, args.weights
    )
    if args.dry_run:
        log.info(f"would finetune from {origin}")
        return 0
    tags = origin.tags(args.task or config.tracking.experiment)
    result = launch(config, plan, kind=origin.kind, tags=tags, init=origin.weights)
    log.info(f"finetuning finished: MLflow run {result.run_id}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipeline.finetune``."""
    return cli.main(argv, parse_args, finetune)


if __name__ == "__main__":
    cli.finish(main())
