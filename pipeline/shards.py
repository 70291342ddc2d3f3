"""``python -m pipeline.shards``: write webdataset shards, index shards written by others, inspect.

    python -m pipeline.shards write shapes file:///tmp/shapes --num-samples 2000 --resolution 64
    python -m pipeline.shards write s3://b/imagenet s3://b/imagenet-wds --workers 16 --max-side 512
    python -m pipeline.shards write /data/imagenet s3://b/in1k --val-labels /data/val_labels.txt
    python -m pipeline.shards write s3://b/hf-imagenet-1k/data s3://b/in1k-wds   # parquet files
    python -m pipeline.shards index 's3://b/laion/{00000..01023}.tar' --info-url s3://mine/laion
    python -m pipeline.shards inspect file:///tmp/shapes --grid shapes.png

SOURCE: shapes, digits, an image tree (class folders, or ImageNet's train/ + val/) on any fsspec
URL, Hugging Face parquet files, or tar shards (a brace pattern, or a set with _info.json). With
RAY_ADDRESS set, or --workers N (a local Ray cluster), every shard is one Ray task; a re-run
keeps the complete shards. Endpoints and credentials of object stores come from the standard
environment (AWS_ENDPOINT_URL, ...) or from ``--storage-options`` (JSON).
Exit codes: 0 success, 2 bad input (source, URL, option), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging

from pipeline.cli import add_verbosity, bad_input, configure_logging, finish
from pipeline.data.catalog import open_source
from pipeline.data.index import index_shards
from pipeline.data.inspect import inspect_shards
from pipeline.data.parallel import start_ray
from pipeline.data.sources import SourceError
from pipeline.data.storage import StorageError
from pipeline.data.writer import write_shards

log = logging.getLogger("pipeline.shards")  # not __name__: that is "__main__" under python -m


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.shards",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--storage-options", type=json.loads, default=None, help="fsspec JSON")
    add_verbosity(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write shards from a source to a URL")
    write.add_argument("source", help="shapes, digits, an image tree, parquet files, tar shards")
    write.add_argument("dest_url", help="where the shards go (file://, s3://, gs://, memory://)")
    write.add_argument("--samples-per-shard", type=int, default=1000)
    write.add_argument("--num-samples", type=int, help="shapes (default 10000); digits: first N")
    write.add_argument("--resolution", type=int, default=None, help="shapes/digits (default 64)")
    write.add_argument("--num-classes", type=int, default=10, help="shapes: 2..40")
    write.add_argument("--seed", type=int, default=0, help="split order and shapes content")
    split = write.add_mutually_exclusive_group()
    split.add_argument("--val-samples", type=int, default=None, help="validation split size")
    split.add_argument("--val-fraction", type=float, default=0.1, help="default 0.1")
    write.add_argument("--val-labels", help="labels file of a flat ImageNet validation folder")
    write.add_argument("--max-side", type=int, help="resize images whose longer side is larger")
    write.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    write.add_argument("--workers", type=int, help="Ray workers of a local cluster")
    write.add_argument("--quiet", dest="no_progress", action="store_true", help="no progress bar")
    index = commands.add_parser("index", help="write an _info.json for shards written by others")
    index.add_argument("pattern", help="brace pattern of the train shards")
    index.add_argument("--validation", help="brace pattern of the validation shards")
    index.add_argument("--info-url", help="where _info.json goes (default: next to the shards)")
    index.add_argument("--name", help="the set's name (default: the folder's)")
    index.add_argument("--num-classes", type=int, help="default: the largest class seen + 1")
    index.add_argument("--threads", type=int, default=16, help="shards read at once")
    inspect = commands.add_parser("inspect", help="describe a shard set and save a sample grid")
    inspect.add_argument("url")
    inspect.add_argument("--grid", default=None, help="PNG path/URL (default ./<name>-grid.png)")
    inspect.add_argument("--grid-samples", type=int, default=16)
    inspect.add_argument(
        "--verify", action="store_true", help="read every shard, compare counts with _info.json"
    )
    return parser


def _pick(args: argparse.Namespace, *names: str) -> dict:
    return {name: getattr(args, name) for name in names}


def _write(args: argparse.Namespace) -> None:
    options = args.storage_options
    picked = _pick(args, "num_samples", "resolution", "seed", "num_classes", "val_labels")
    source = open_source(args.source, storage_options=options, **picked)
    picked = _pick(args, "samples_per_shard", "val_samples", "val_fraction", "seed", "max_side")
    info = write_shards(
        source,
        args.dest_url,
        storage_options=options,
        progress=not (args.no_progress or args.quiet),
        quality=args.quality,
        use_ray=start_ray(args.workers),
        **picked,
    )
    counts = {name: split.num_samples for name, split in info.splits.items()}
    log.info(f"wrote {info.url}: {counts} samples, {info.num_classes} classes")
    log.info(f"corrupt images left out: {len(info.corrupt)}")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; the exit code follows the project's convention (2 = bad input)."""
    args = _parser().parse_args(argv)  # argparse exits with 2 on a bad option
    configure_logging(args)
    try:
        if args.command == "write":
            _write(args)
        elif args.command == "index":
            picked = _pick(args, "info_url", "name", "num_classes", "threads")
            index_shards(
                args.pattern, args.validation, **picked, storage_options=args.storage_options
            )
        else:
            inspect_shards(
                args.url, args.grid, args.grid_samples, args.verify, args.storage_options
            )
    except (StorageError, SourceError, ValueError) as exc:
        return bad_input(str(exc))
    return 0


if __name__ == "__main__":
    finish(main())
