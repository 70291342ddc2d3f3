"""Tar shards written by others (timm's ``imagenet-1k-wds``, img2dataset, ...) as a source.

A shard set with an ``_info.json`` (timm's layout) brings its splits, shard lengths and class
names; a brace pattern of shards without one is counted first (``pipeline.data.index``). Tar is
read front to back, so the writer takes the samples in their stored order (writers of such sets
shuffle before writing) and an output shard reads one or two input shards. Sample positions
count the samples with an image and a class, as the index does.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.data.decode import image_bytes, sample_label
from pipeline.data.index import count_shards, shard_urls
from pipeline.data.info import TRAIN_SPLIT, is_pattern, read_info
from pipeline.data.shardio import SkipCounter, iter_shard
from pipeline.data.sources import RawSample, SourceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TarPart:
    """Runs of samples: ``(shard URL, first position, count, index of the first)``."""

    runs: tuple[tuple[str, int, int, int], ...]
    storage_options: dict | None = None

    def __iter__(self) -> Iterator[RawSample]:
        for url, first, count, index in self.runs:
            position = 0
            for sample in iter_shard(url, SkipCounter(), self.storage_options):
                data, label = image_bytes(sample), sample_label(sample)
                if data is None or label is None or label < 0:
                    continue
                if position >= first:
                    origin = f"{posixpath.basename(url)}#{sample['__key__']}"
                    yield index + position - first, origin, data, label
                position += 1
                if position == first + count:
                    break


@dataclass
class TarSource:
    """Shards by split with their sample counts."""

    url: str
    name: str
    class_names: list[str]
    splits: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = field(default_factory=dict)
    storage_options: dict | None = None

    def split_sizes(self) -> dict[str, int]:
        """Samples per split."""
        return {split: sum(lengths) for split, (_, lengths) in self.splits.items()}

    def order(self, split: str, rng: np.random.Generator) -> np.ndarray:
        """Stored order: tar reads front to back."""
        return np.arange(self.split_sizes()[split])

    def part(self, split: str, indices: Sequence[int]) -> TarPart:
        """The samples ``indices`` of ``split`` (ascending runs), as per-shard runs."""
        urls, lengths = self.splits[split]
        starts = np.concatenate([[0], np.cumsum(lengths)])
        runs: list[list] = []
        for index in (int(i) for i in indices):
            shard = int(np.searchsorted(starts, index, side="right")) - 1
            position = index - int(starts[shard])
            last = runs[-1] if runs else None
            if last and last[0] == urls[shard] and last[1] + last[2] == position:
                last[2] += 1
            else:
                runs.append([urls[shard], position, 1, index])
        return TarPart(tuple(tuple(run) for run in runs), self.storage_options)

    def describe(self) -> dict:
        """What identifies this source's content (for the writer's resume check)."""
        return {"source": "tar", "url": self.url, "num_samples": self.split_sizes()}


def tar_source(url: str, storage_options: dict | None = None) -> TarSource:
    """Shards at ``url``: a shard set with an ``_info.json``, or a brace pattern (counted)."""
    url = url.rstrip("/")
    if is_pattern(url) or url.endswith(".tar"):
        counts = count_shards(shard_urls(url, storage_options), storage_options)
        largest = max((c.max_label for c in counts), default=-1)
        if largest < 0:
            raise SourceError(f"{url}: no sample with an image and a class")
        splits = {TRAIN_SPLIT: (tuple(c.url for c in counts), tuple(c.samples for c in counts))}
        class_names = [str(c) for c in range(largest + 1)]
        name = posixpath.basename(url.rsplit("/", 1)[0].split("://", 1)[-1]) or "shards"
    else:
        info = read_info(url, storage_options)
        splits = {s.name: (s.shard_urls, s.shard_lengths) for s in info.splits.values()}
        class_names, name = list(info.class_names), info.name or posixpath.basename(url)
    source = TarSource(url, name, class_names, splits, storage_options)
    log.info(f"{url}: tar shards, {len(class_names)} classes, {source.split_sizes()} samples")
    return source
