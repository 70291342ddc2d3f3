"""``python -m pipeline.experiments {list, show NAME, run NAME}``: the paper's claims, runnable.

An experiment is a YAML file in ``configs/experiments/``: a base run config, the datasets it
needs, overrides common to every run, a list of runs (each a name and its overrides, optionally
finetuned from an earlier run's checkpoint) and a time budget. ``run NAME``:

1. writes the datasets that are missing (``shapes``/``digits`` shards under ``--out``);
2. joins the Ray cluster at ``RAY_ADDRESS``/``--ray-address`` or starts one on 127.0.0.1;
3. trains the runs one at a time (2 cores) through the pretraining launcher
   (:func:`pipeline.run.launch.launch`), each as a run of MLflow experiment NAME tagged with its
   name;
4. skips runs that already finished, so a stopped experiment continues where it was.

``--only a,b`` and ``--set key=value`` shrink an experiment (the tests run two runs of a few
steps). Then ``python -m pipeline.compare --experiment NAME`` draws its figures and table.
Exit codes: 0 every run finished, 2 bad input (name, file, config, reference), 1 a run failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import cli
from pipeline.run import ROOT
from pipeline.run.experiments import (
    available,
    load_experiment,
    run_configs,
    run_experiment,
    select_runs,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line: ``list``, ``show NAME`` or ``run NAME``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.experiments",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="the experiments in configs/experiments/")
    show = commands.add_parser("show", help="each run's resolved overrides, nothing started")
    run = commands.add_parser("run", help="train the experiment's runs (finished ones are kept)")
    for sub in (show, run):
        sub.add_argument("name", help="an experiment name (python -m pipeline.experiments list)")
        sub.add_argument("--out", type=Path, default=ROOT / "experiments_out")
        sub.add_argument("--tracking-uri", default=None, help="default: sqlite:///OUT/mlflow.db")
        sub.add_argument("--only", default=None, help="comma-separated run names")
        sub.add_argument(
            "--set", dest="extra", action="append", default=[], help="override for every run"
        )
    run.add_argument("--ray-address", default=None, help="default: RAY_ADDRESS or a local Ray")
    for sub in (listing, show, run):
        cli.add_verbosity(sub)
    return parser.parse_args(argv)


def show_or_run(args: argparse.Namespace) -> int:
    """Validate the experiment and every run's config; then list the runs or train them."""
    name, spec = load_experiment(args.name)
    out = args.out.resolve()
    tracking_uri = args.tracking_uri or f"sqlite:///{out}/mlflow.db"
    only = args.only.split(",") if args.only else None
    select_runs(name, spec, only)
    configs = run_configs(name, spec, out, tracking_uri, args.extra)
    if args.command == "show":
        for run in spec.runs:
            config = configs[run.name]
            print(f"{run.name}: {run.kind} {config.model.name} batch {config.train.global_batch}")
        return 0
    failed = run_experiment(name, spec, out, tracking_uri, only, args.extra, args.ray_address)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipeline.experiments``."""
    args = parse_args(argv)
    cli.configure_logging(args)
    if args.command == "list":
        for name in available():
            print(f"{name:12s} {load_experiment(name)[1].claim}")
        return 0
    return cli.run(lambda: show_or_run(args))


if __name__ == "__main__":
    cli.finish(main())
