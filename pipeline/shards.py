"""``python -m pipeline.shards``: write webdataset shards from a source, inspect a shard set.

    python -m pipeline.shards write shapes file:///tmp/shapes --num-samples 2000 --resolution 64
    python -m pipeline.shards write digits s3://bucket/digits --samples-per-shard 256
    python -m pipeline.shards write /data/my_images file:///tmp/mine --val-fraction 0.05
    python -m pipeline.shards inspect file:///tmp/shapes --grid shapes.png

Endpoints and credentials of object stores come from the standard environment (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, ...) or from ``--storage-options '{"client_kwargs": {...}}'`` (JSON).
Exit codes: 0 success, 2 bad input (source, URL, option), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.cli import add_verbosity, bad_input, configure_logging
from pipeline.data.inspect import inspect_shards
from pipeline.data.sources import SourceError, from_name
from pipeline.data.storage import StorageError
from pipeline.data.writer import write_shards

log = logging.getLogger("pipeline.shards")  # not __name__: that is "__main__" under python -m


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.shards",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--storage-options",
        type=json.loads,
        default=None,
        help="JSON dict passed to the fsspec filesystem",
    )
    add_verbosity(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write shards from a source to a URL")
    write.add_argument("source", help="'shapes', 'digits' or an ImageFolder directory")
    write.add_argument("dest_url", help="where the shards go (file://, s3://, gs://, memory://)")
    write.add_argument("--samples-per-shard", type=int, default=1000)
    write.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="shapes: how many (default 10000); digits: first N of 1797",
    )
    write.add_argument("--resolution", type=int, default=None, help="shapes/digits (default 64)")
    write.add_argument("--num-classes", type=int, default=10, help="shapes: 2..40")
    write.add_argument("--seed", type=int, default=0, help="split order and shapes content")
    split = write.add_mutually_exclusive_group()
    split.add_argument("--val-samples", type=int, default=None, help="validation split size")
    split.add_argument("--val-fraction", type=float, default=0.1, help="default 0.1")
    write.add_argument("--quiet", dest="no_progress", action="store_true", help="no progress bar")
    inspect = commands.add_parser("inspect", help="describe a shard set and save a sample grid")
    inspect.add_argument("url")
    inspect.add_argument("--grid", default=None, help="PNG path/URL (default ./<name>-grid.png)")
    inspect.add_argument("--grid-samples", type=int, default=16)
    inspect.add_argument(
        "--verify",
        action="store_true",
        help="read every shard and compare sample counts with _info.json",
    )
    return parser


def _write(args: argparse.Namespace) -> None:
    source = from_name(
        args.source,
        num_samples=args.num_samples,
        resolution=args.resolution,
        seed=args.seed,
        num_classes=args.num_classes,
    )
    info = write_shards(
        source,
        args.dest_url,
        samples_per_shard=args.samples_per_shard,
        val_samples=args.val_samples,
        val_fraction=args.val_fraction,
        seed=args.seed,
        storage_options=args.storage_options,
        progress=not (args.no_progress or args.quiet),
    )
    counts = {name: split.num_samples for name, split in info.splits.items()}
    log.info(f"wrote {info.url}: {counts} samples, {info.num_classes} classes")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; the exit code follows the project's convention (2 = bad input)."""
    args = _parser().parse_args(argv)  # argparse exits with 2 on a bad option
    configure_logging(args)
    try:
        if args.command == "write":
            _write(args)
        else:
            inspect_shards(
                args.url, args.grid, args.grid_samples, args.verify, args.storage_options
            )
    except (StorageError, SourceError, ValueError) as exc:
        return bad_input(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
