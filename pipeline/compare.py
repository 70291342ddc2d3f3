"""``python -m pipeline.compare [RUN_ID ... | --experiment NAME | --same-as URI] [--out DIR]``:
compare runs.

Reads MLflow only. Prints a table (per run: final and best of the main metrics, then the params
that differ between the runs) and writes PNG plots to ``--out``:

- ``loss.png`` and ``top1.png``: ``train/loss`` and ``val/top1`` (+ EMA) against step, per run;
- ``downstream.png``: finetuned ``val/top1`` against the pretraining step it started from, one line
  per task, with the task's scratch baseline as a horizontal line;
- ``finetune_vs_scratch.png``: per task, the finetune from the latest checkpoint against scratch.

``--same-as URI``: instead, check that a rerun reproduced: every run of ``--tracking-uri`` (of
``--experiment``, if given) against the run of the same name in ``URI``, every metric point
exactly (timing metrics left out); exit 0 when identical, 1 with each difference listed.

Finetune and scratch runs are found through their lineage tags (``pipeline.tracking.TAG_*``) in
every experiment, so comparing a pretraining run by id also shows its downstream results. An
experiment of ``python -m pipeline.experiments`` also gets its figure and ``table.md``.
"""

from __future__ import annotations

import argparse
import logging
import os

from pipeline.analysis import CompareError, compare_runs
from pipeline.analysis.reproduce import compare_stores, describe
from pipeline.cli import add_verbosity, bad_input, configure_logging, finish

__all__ = ["compare_runs", "main"]
log = logging.getLogger("pipeline.compare")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.compare", description=__doc__)
    parser.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="MLflow run ids")
    parser.add_argument("--experiment", help="compare every run of this MLflow experiment")
    parser.add_argument("--out", default="compare_out", help="folder for the PNG plots")
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    parser.add_argument(
        "--same-as", metavar="URI", help="check every run against the same-named run at URI"
    )
    add_verbosity(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; 2 on unknown runs, experiments or tracking URIs."""
    args = _parser().parse_args(argv)
    configure_logging(args)
    try:
        if args.same_as:
            result = compare_stores(args.tracking_uri, args.same_as, args.experiment)
            log.info(describe(result))
            return 0 if result.identical else 1
        compare_runs(args.tracking_uri, args.run_ids or None, args.experiment, args.out)
    except CompareError as exc:
        return bad_input(str(exc))
    return 0


if __name__ == "__main__":
    finish(main())
