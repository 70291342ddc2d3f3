"""Shards written by others, used as they are: count their samples, write an ``_info.json``.

``index_shards`` reads every shard of a brace pattern (in parallel threads: the work is waiting
for storage), counts the samples that have an image (``jpg``/``jpeg``/``png``/``webp``) and a
class (a ``cls`` member, or an integer ``cls``/``label``/``class`` in the ``json`` member, as
img2dataset writes extra columns), and writes the ``_info.json`` the loaders read: next to the
shards, or at another URL when their bucket cannot be written (the splits then carry a
``base_url``). The class count is the largest class seen plus one unless it is given.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass

from pipeline.data.decode import image_bytes, sample_label
from pipeline.data.info import (
    INFO_NAME,
    TRAIN_SPLIT,
    VALIDATION_SPLIT,
    DatasetInfo,
    SplitInfo,
    expand_pattern,
    info_to_json,
)
from pipeline.data.shardio import SkipCounter, iter_shard
from pipeline.data.storage import (
    StorageError,
    atomic_write_bytes,
    join_url,
    read_ahead,
    read_existing,
    url_sizes,
)

log = logging.getLogger(__name__)

COUNT_THREADS = 16  # shards read at once while indexing


@dataclass(frozen=True)
class ShardCount:
    """What one shard holds: usable samples (image and class), the others, the largest class."""

    url: str
    samples: int
    unusable: int
    max_label: int
    truncated: bool


def count_shard(url: str, storage_options: dict | None = None) -> ShardCount:
    """Read the shard at ``url`` and count its samples."""
    counter = SkipCounter()
    samples = unusable = 0
    max_label = -1
    for sample in iter_shard(url, counter, storage_options):
        label = sample_label(sample)
        if image_bytes(sample) is None or label is None or label < 0:
            unusable += 1
            continue
        samples += 1
        max_label = max(max_label, label)
    truncated = counter.by_reason()["truncated_shard"] > 0
    return ShardCount(url, samples, unusable, max_label, truncated)


def shard_urls(pattern: str, storage_options: dict | None = None) -> list[str]:
    """The URLs of a brace pattern, each checked to exist (one listing per folder)."""
    urls = expand_pattern(pattern)
    listed: dict[str, dict[str, int]] = {}
    missing = []
    for url in urls:
        folder, name = url.rsplit("/", 1) if "/" in url else (".", url)
        if folder not in listed:
            listed[folder] = url_sizes(folder, storage_options)
        if name not in listed[folder]:
            missing.append(url)
    if len(missing) == len(urls):
        raise StorageError(pattern, "the pattern matches no shard")
    if missing:
        raise StorageError(missing[0], f"does not exist ({len(missing)} of the pattern's shards)")
    return urls


def count_shards(
    urls: list[str], storage_options: dict | None = None, threads: int = COUNT_THREADS
) -> list[ShardCount]:
    """``count_shard`` of every URL, ``threads`` at a time; StorageError for a shard that has
    samples but not one with a class."""
    counts = []
    for count in read_ahead(lambda url: count_shard(url, storage_options), urls, threads):
        if count.samples == 0 and count.unusable:
            raise StorageError(
                count.url,
                "no sample has a class (a .cls member or an integer 'label'/'cls' in .json)",
            )
        if count.truncated:
            log.warning(f"{count.url}: truncated; {count.samples} samples before the cut")
        counts.append(count)
    return counts


def _split(name: str, counts: list[ShardCount]) -> SplitInfo:
    return SplitInfo(name, tuple(c.url for c in counts), tuple(c.samples for c in counts))


def index_shards(
    pattern: str,
    validation: str | None = None,
    *,
    info_url: str | None = None,
    name: str | None = None,
    num_classes: int | None = None,
    storage_options: dict | None = None,
    threads: int = COUNT_THREADS,
) -> DatasetInfo:
    """Count the shards of ``pattern`` (and ``validation``) and write their ``_info.json``."""
    patterns = {TRAIN_SPLIT: pattern, VALIDATION_SPLIT: validation}
    counts = {
        split: count_shards(shard_urls(p, storage_options), storage_options, threads)
        for split, p in patterns.items()
        if p is not None
    }
    largest = max(c.max_label for split in counts.values() for c in split)
    if num_classes is not None and largest >= num_classes:
        raise ValueError(f"{pattern}: class {largest} found, but --num-classes is {num_classes}")
    classes = num_classes or largest + 1
    target = (info_url or counts[TRAIN_SPLIT][0].url.rsplit("/", 1)[0]).rstrip("/")
    info = DatasetInfo(
        url=target,
        name=name or posixpath.basename(target.split("://", 1)[-1]),
        num_classes=classes,
        class_names=tuple(str(c) for c in range(classes)),
        splits={split: _split(split, found) for split, found in counts.items()},
        writer={"indexed": {split: p for split, p in patterns.items() if p is not None}},
    )
    document = info_to_json(info)
    info_file = join_url(target, INFO_NAME)
    existing = read_existing([info_file], storage_options).get(info_file)
    if existing is not None and existing != document:
        raise ValueError(
            f"{info_file} already describes another shard set; give --info-url elsewhere"
        )
    atomic_write_bytes(info_file, document, storage_options)
    total = {split: s.num_samples for split, s in info.splits.items()}
    log.info(f"indexed {total} samples, {classes} classes: {info_file}")
    return info
