"""What a shard set holds: per split sample and shard counts, shard sizes, optionally every
sample read back, and a PNG grid of the first images with their class names."""

from __future__ import annotations

import io
import logging
from typing import Any

from PIL import Image, ImageDraw

from pipeline.data.decode import CorruptImage, decode_rgb, image_bytes
from pipeline.data.info import DatasetInfo, read_info
from pipeline.data.shardio import SkipCounter, iter_shard
from pipeline.data.storage import atomic_write_bytes, url_size

THUMBNAIL = 96  # pixels per grid cell

log = logging.getLogger(__name__)


def _first_images(
    info: DatasetInfo, count: int, storage_options: dict | None
) -> list[tuple[Image.Image, str]]:
    """The first ``count`` decodable images of the validation (else train) split, with labels."""
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
                return cells
    return cells


def grid_png(info: DatasetInfo, count: int, storage_options: dict | None) -> bytes:
    """A PNG grid (up to 8 columns) of the first ``count`` images, each named by its class."""
    cells = _first_images(info, count, storage_options)
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


def inspect_shards(
    url: str,
    grid: str | None = None,
    grid_samples: int = 16,
    verify: bool = False,
    storage_options: dict | None = None,
) -> dict[str, Any]:
    """Log what the shard set at ``url`` holds and save a sample grid (default
    ``./<name>-grid.png``); returns ``{"num_classes", "corrupt", "splits": {name: figures},
    "grid"}``.
    ``verify`` reads every shard and compares the sample counts with ``_info.json``."""
    info = read_info(url, storage_options)
    names = ", ".join(info.class_names[:12]) + (" ..." if info.num_classes > 12 else "")
    log.info(f"shard set {info.url}  name={info.name}")
    log.info(f"classes: {info.num_classes} ({names})")
    report: dict[str, Any] = {"num_classes": info.num_classes, "splits": {}}
    report["corrupt"] = len(info.corrupt)
    log.info(f"corrupt images the writer left out: {len(info.corrupt)} (listed in _info.json)")
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
        log.info(line)
    grid_url = grid or f"{info.name}-grid.png"
    atomic_write_bytes(grid_url, grid_png(info, grid_samples, storage_options), storage_options)
    log.info(f"sample grid: {grid_url}")
    report["grid"] = grid_url
    return report
