"""Shard writer: a source -> ``{name}-{split}-{000000..}.tar`` webdataset shards + ``_info.json``.

Deterministic: the splits and their order come from ``seed`` alone, each shard is written by
``pipeline.data.convert.write_shard`` from its job alone, and tar headers carry fixed owners and
mtime, so the same source and seed give byte-identical shards however many processes write them.

Resumable: each shard reaches its final name in one atomic upload and then gets a record
(``_parts/<shard>.json``); a re-run keeps a shard only when its size matches the record and the
record accounts for every sample planned for it, and writes the others. ``_info.json`` is
written last, only when every shard is complete, and marks the set complete. A destination
holding another write's shards (other parameters, another source) is refused before anything is
written.

Parallel: one shard per job, run by ``pipeline.data.parallel`` (one Ray task per shard when Ray
is connected).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import numpy as np

from pipeline.data.convert import (
    ImageOptions,
    ShardJob,
    ShardResult,
    record_url,
    write_shard,
)
from pipeline.data.info import (
    INFO_NAME,
    TRAIN_SPLIT,
    VALIDATION_SPLIT,
    DatasetInfo,
    SplitInfo,
    info_to_json,
)
from pipeline.data.parallel import run_calls
from pipeline.data.sources import JPEG_QUALITY, Source, SplitSource, as_split_source
from pipeline.data.storage import (
    atomic_write_bytes,
    is_temporary_name,
    join_url,
    read_existing,
    remove_url,
    url_sizes,
)

PLAN_NAME = "_write_plan.json"
_SPLIT_STREAM = 0x5917  # separates the split permutation's random stream from other uses of seed
LISTED_CORRUPT = 20  # corrupt images named in the log (all of them are in _info.json)

log = logging.getLogger(__name__)


class WriteConflict(ValueError):
    """The destination holds a partial write made with other parameters, or another set."""


def split_orders(source: SplitSource, num_val: int, seed: int) -> dict[str, tuple[str, np.ndarray]]:
    """Per output split: the source split its samples come from and their indices there, in
    the order they are written (drawn from ``seed``).

    A source with its own validation split keeps it; otherwise the first ``num_val`` samples of
    the order the source asks for become the validation split.
    """
    sizes = source.split_sizes()
    if VALIDATION_SPLIT in sizes:
        return {
            split: (split, source.order(split, np.random.default_rng([seed, _SPLIT_STREAM, n])))
            for n, split in enumerate(sorted(sizes))
        }
    order = source.order(TRAIN_SPLIT, np.random.default_rng([seed, _SPLIT_STREAM]))
    splits = {TRAIN_SPLIT: (TRAIN_SPLIT, order[num_val:])}
    if num_val:
        splits[VALIDATION_SPLIT] = (TRAIN_SPLIT, order[:num_val])
    return splits


def validation_count(num_samples: int, val_samples: int | None, val_fraction: float) -> int:
    """The size of a carved validation split; ValueError unless the train split keeps one."""
    count = val_samples if val_samples is not None else int(round(num_samples * val_fraction))
    if not 0 <= count < num_samples:
        raise ValueError(
            f"validation size {count} must be in 0..{num_samples - 1} (the source has "
            f"{num_samples} samples and the train split needs at least one)"
        )
    return count


def _check_plan(dest_url: str, plan: dict, storage_options: dict | None) -> None:
    """Record the write's parameters, or refuse a destination that holds another write."""
    plan_url, info_url = join_url(dest_url, PLAN_NAME), join_url(dest_url, INFO_NAME)
    encoded = json.dumps(plan, indent=1, sort_keys=True).encode()
    found = read_existing([plan_url, info_url], storage_options)
    if plan_url in found and json.loads(found[plan_url]) != plan:
        raise WriteConflict(
            f"{dest_url} holds shards written with other parameters "
            f"({found[plan_url].decode()}); write to an empty destination or delete it first"
        )
    if plan_url not in found:
        names = url_sizes(dest_url, storage_options)
        if info_url in found or any(name.endswith(".tar") for name in names):
            raise WriteConflict(
                f"{dest_url} already holds a shard set this command did not write; "
                "write to an empty destination or delete it first"
            )
        atomic_write_bytes(plan_url, encoded, storage_options)


def plan_jobs(
    source: SplitSource, orders: dict[str, tuple[str, np.ndarray]], per_shard: int
) -> list[ShardJob]:
    """The shards of every split, ``per_shard`` samples each (the last one of a split fewer)."""
    return [
        ShardJob(
            split,
            f"{source.name}-{split}-{number:06d}.tar",
            order[start : start + per_shard],
            origin,
        )
        for split, (origin, order) in orders.items()
        for number, start in enumerate(range(0, len(order), per_shard))
    ]


def finished_shards(
    dest_url: str, jobs: list[ShardJob], storage_options: dict | None
) -> dict[str, ShardResult]:
    """The shards of ``jobs`` already complete at ``dest_url``, by file name.

    Complete: present, of the size its record states, and its record accounts for every sample
    planned for it. Leftovers of a killed atomic write are deleted.
    """
    sizes = url_sizes(dest_url, storage_options)
    for name in [n for n in sizes if is_temporary_name(n)]:
        remove_url(join_url(dest_url, name), storage_options)  # never a shard, only a part of one
    present = [job for job in jobs if job.filename in sizes]
    records = read_existing([record_url(dest_url, j.filename) for j in present], storage_options)
    finished = {}
    for job in present:
        raw = records.get(record_url(dest_url, job.filename))
        try:
            result = ShardResult.from_json(raw) if raw is not None else None
        except ValueError:
            result = None
        if (
            result is not None
            and result.bytes == sizes[job.filename]
            and result.samples + len(result.corrupt) == job.planned
        ):
            finished[job.filename] = result
    return finished


def _calls(jobs: list[ShardJob], source: SplitSource, *rest) -> Iterator[tuple]:
    for job in jobs:
        # The part (a shard's sample list) is built as its task is submitted, not all up front.
        yield job, source.part(job.source_split, job.indices), *rest


def _report(dest_url: str, corrupt: list[dict]) -> None:
    if not corrupt:
        return
    log.warning(f"{dest_url}: {len(corrupt)} corrupt image(s) left out (all in {INFO_NAME}):")
    for entry in corrupt[:LISTED_CORRUPT]:
        log.warning(f"  {entry['split']}: {entry['source']}: {entry['reason']}")


def write_shards(
    source: Source | SplitSource,
    dest_url: str,
    *,
    samples_per_shard: int = 1000,
    val_samples: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    storage_options: dict | None = None,
    progress: bool = True,
    max_side: int | None = None,
    quality: int = JPEG_QUALITY,
    use_ray: bool = False,
) -> DatasetInfo:
    """Write ``source`` as train/validation shards to ``dest_url``; keep shards already complete.

    With ``use_ray``, one Ray task per shard on the cluster this process is connected to
    (``parallel.start_ray``); else the shards are written one after another here.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    options = ImageOptions(max_side, quality)
    dest_url = dest_url.rstrip("/")
    splits = as_split_source(source)
    sizes = splits.split_sizes()
    if VALIDATION_SPLIT in sizes:
        num_val = sizes[VALIDATION_SPLIT]
        log.info(f"{splits.name}: the source's own validation split, {num_val} samples, is kept")
    else:
        num_val = validation_count(sizes[TRAIN_SPLIT], val_samples, val_fraction)
    plan = {
        "source": splits.describe(),
        "seed": seed,
        "samples_per_shard": samples_per_shard,
        "val_samples": num_val,
        "max_side": max_side,
        "quality": quality,
    }
    _check_plan(dest_url, plan, storage_options)
    jobs = plan_jobs(splits, split_orders(splits, num_val, seed), samples_per_shard)
    results = finished_shards(dest_url, jobs, storage_options)
    todo = [job for job in jobs if job.filename not in results]
    if results:
        log.info(f"{dest_url}: {len(results)} of {len(jobs)} shards already complete")
    for result in run_calls(
        write_shard,
        _calls(todo, splits, dest_url, options, storage_options),
        total=sum(job.planned for job in todo),
        count=lambda r: r.samples + len(r.corrupt),
        progress=progress,
        desc=f"write {dest_url}",
        use_ray=use_ray,
    ):
        results[result.filename] = result
    by_split: dict[str, list[ShardResult]] = {}
    for job in jobs:
        by_split.setdefault(job.split, []).append(results[job.filename])
    corrupt = [entry for job in jobs for entry in results[job.filename].corrupt]
    info = DatasetInfo(
        url=dest_url,
        name=splits.name,
        num_classes=len(splits.class_names),
        class_names=tuple(splits.class_names),
        splits={
            split: SplitInfo(
                split,
                tuple(join_url(dest_url, r.filename) for r in done),
                tuple(r.samples for r in done),
            )
            for split, done in by_split.items()
        },
        writer=plan,
        corrupt=tuple(corrupt),
    )
    atomic_write_bytes(join_url(dest_url, INFO_NAME), info_to_json(info), storage_options)
    _report(dest_url, corrupt)
    return info
