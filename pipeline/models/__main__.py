"""``python -m pipeline.models {list,info,spp}``: inspect the registered NFNets."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli import add_verbosity, bad_input, configure_logging, finish
from pipeline.models.registry import list_models
from pipeline.models.summary import plot_signal_propagation, summarize


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.models", description=__doc__)
    add_verbosity(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the registered models")
    info = sub.add_parser("info", help="parameters and FLOPs (DM count_flops convention)")
    info.add_argument("name")
    info.add_argument("--resolution", type=int, help="image size (default: test resolution)")
    spp = sub.add_parser("spp", help="signal propagation plot at initialisation")
    spp.add_argument("name")
    spp.add_argument("--out", type=Path, required=True, help="PNG file to write")
    spp.add_argument("--batch", type=int, default=8)
    spp.add_argument("--size", type=int, default=64, help="spatial size of the body input")
    spp.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for bad input)."""
    args = _parser().parse_args(argv)
    configure_logging(args)
    try:
        if args.command == "list":
            print("\n".join(list_models()))
        elif args.command == "info":
            if args.resolution is not None and args.resolution < 1:
                raise ValueError(f"--resolution must be positive, got {args.resolution}")
            print("\n".join(summarize(args.name, args.resolution).lines()))
        else:
            if not args.out.parent.is_dir():
                raise ValueError(f"--out {args.out}: directory {args.out.parent} does not exist")
            plot_signal_propagation(args.name, args.out, args.batch, args.size, args.seed)
    except ValueError as error:
        return bad_input(str(error))
    return 0


if __name__ == "__main__":
    finish(main())
