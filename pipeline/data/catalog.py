"""Which source a name or URL means: generated sets, image trees, parquet files, tar shards."""

from __future__ import annotations

import os

from pipeline.data.imagefolder import imagefolder
from pipeline.data.info import INFO_NAME, is_pattern
from pipeline.data.parquet import parquet_source
from pipeline.data.sources import Source, SourceError, SplitSource, digits, shapes
from pipeline.data.storage import StorageError, find_files, join_url, url_exists
from pipeline.data.tarsource import tar_source


def open_source(
    name: str,
    *,
    num_samples: int | None = None,
    resolution: int | None = None,
    seed: int = 0,
    num_classes: int = 10,
    val_labels: str | None = None,
    storage_options: dict | None = None,
) -> Source | SplitSource:
    """The source ``name`` means: ``shapes``, ``digits``, a brace pattern or ``.tar`` of shards,
    a ``.parquet`` file, or a folder/URL holding a shard set (``_info.json``), parquet files or
    an image tree. SourceError/StorageError naming the URL when it cannot be read."""
    if name == "shapes":
        return shapes(num_samples or 10_000, resolution or 64, seed, num_classes)
    if name == "digits":
        return digits(resolution or 64, num_samples)
    if is_pattern(name) or name.endswith(".tar"):
        return tar_source(name, storage_options)
    if name.endswith(".parquet"):
        return parquet_source(name, storage_options)
    if "://" not in name and not os.path.exists(name):
        raise SourceError(
            f"unknown source {name!r}: expected 'shapes', 'digits', an existing folder or a URL"
        )
    try:
        if url_exists(join_url(name, INFO_NAME), storage_options):
            return tar_source(name, storage_options)
        paths = find_files(name, storage_options)
    except StorageError as exc:
        raise SourceError(f"source {exc.url}: {exc.reason}") from exc
    if not paths:
        raise SourceError(f"source {name!r} does not exist or holds no files")
    if any(path.endswith(".parquet") for path in paths):
        return parquet_source(name, storage_options, paths)
    return imagefolder(name, storage_options, val_labels, paths)
