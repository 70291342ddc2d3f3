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
import io
import json
import sys

from PIL import Image, ImageDraw

from pipeline.data.decode import CorruptImage, decode_rgb, image_bytes
from pipeline.data.info import DatasetInfo, read_info
from pipeline.data.shardio import SkipCounter, iter_shard
from pipeline.data.sources import SourceError, from_name
from pipeline.data.storage import StorageError, atomic_write_bytes, url_size
from pipeline.data.writer import write_shards

THUMBNAIL = 96  # pixels per grid cell


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
    write.add_argument("--quiet", action="store_true", help="no progress bar")
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


def _grid_png(info: DatasetInfo, count: int, storage_options: dict | None) -> bytes:
    """A PNG grid of the first ``count`` images of the validation (else train) split."""
    split = info.splits.get("validation") or info.split("train")
    cells = []
    counter = SkipCounter()
    for url in split.shard_urls:
        for sample in iter_shard(url, counter, storage_options):
            data = image_bytes(sample)
            try:
                image = decode_rgb(data) if data is not None else None
            except CorruptImage:
                image = None
            if image is not None:
                label = sample.get("cls", b"?").decode(errors="replace").strip()
                cells.append((Image.fromarray(image.permute(1, 2, 0).numpy()), label))
            if len(cells) == count:
                break
        if len(cells) == count:
            break
    columns = max(1, min(8, len(cells)))
    rows = max(1, -(-len(cells) // columns))
    grid = Image.new("RGB", (columns * THUMBNAIL, rows * THUMBNAIL), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for position, (image, label) in enumerate(cells):
        x, y = (position % columns) * THUMBNAIL, (position // columns) * THUMBNAIL
        grid.paste(image.resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BICUBIC), (x, y))
        known = label.isdigit() and int(label) < info.num_classes
        name = info.class_names[int(label)] if known else label
        draw.rectangle((x, y, x + THUMBNAIL - 1, y + 12), fill=(0, 0, 0))
        draw.text((x + 2, y), name[:14], fill=(255, 255, 255))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    return buffer.getvalue()


def inspect(
    url: str, grid: str | None, grid_samples: int, verify: bool, storage_options: dict | None
) -> dict:
    """Print what the shard set at ``url`` holds; save a sample grid; return the figures."""
    info = read_info(url, storage_options)
    names = ", ".join(info.class_names[:12]) + (" ..." if info.num_classes > 12 else "")
    print(f"shard set {info.url}  name={info.name}")
    print(f"classes: {info.num_classes} ({names})")
    report = {"num_classes": info.num_classes, "splits": {}}
    for split in info.splits.values():
        sizes = [url_size(u, storage_options) for u in split.shard_urls]
        line = (
            f"split {split.name}: {split.num_samples} samples in {len(sizes)} shards; "
            f"shard bytes min {min(sizes)} / mean {sum(sizes) // len(sizes)} / max {max(sizes)}"
        )
        figures = {"num_samples": split.num_samples, "num_shards": len(sizes), "bytes": sum(sizes)}
        if verify:
            counter = SkipCounter()
            found = sum(
                1 for u in split.shard_urls for _ in iter_shard(u, counter, storage_options)
            )
            figures.update(samples_read=found, problems=counter.by_reason())
            line += f"; read {found} samples" + (
                "" if found == split.num_samples else " (MISMATCH)"
            )
        report["splits"][split.name] = figures
        print(line)
    grid_url = grid or f"{info.name}-grid.png"
    atomic_write_bytes(grid_url, _grid_png(info, grid_samples, storage_options), storage_options)
    print(f"sample grid: {grid_url}")
    report["grid"] = grid_url
    return report


def main(argv: list[str] | None = None) -> int:
    """Run the command line; the exit code follows the project's convention (2 = bad input)."""
    parser = _parser()
    args = parser.parse_args(argv)  # argparse exits with 2 on a bad option
    try:
        if args.command == "write":
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
                progress=not args.quiet,
            )
            counts = {name: split.num_samples for name, split in info.splits.items()}
            print(f"wrote {info.url}: {counts} samples, {info.num_classes} classes")
        else:
            inspect(args.url, args.grid, args.grid_samples, args.verify, args.storage_options)
    except (StorageError, SourceError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
