"""Shard writer: a source -> ``{name}-{split}-{000000..}.tar`` webdataset shards + ``_info.json``.

Deterministic: the split and the order come from ``seed`` alone and tar headers carry fixed
owners and mtime, so the same source and seed give byte-identical shards. Resumable: each shard
reaches its final name in one atomic write, so a re-run keeps the shards that exist and writes
the rest; ``_info.json`` is written last and marks the set complete.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Sequence

import numpy as np
import webdataset as wds
from tqdm import tqdm

from pipeline.data.info import (
    INFO_NAME,
    TRAIN_SPLIT,
    VALIDATION_SPLIT,
    DatasetInfo,
    SplitInfo,
    info_to_json,
)
from pipeline.data.sources import Source
from pipeline.data.storage import (
    StorageError,
    atomic_write_bytes,
    is_temporary_name,
    join_url,
    list_urls,
    read_bytes,
    remove_url,
)

PLAN_NAME = "_write_plan.json"
_SPLIT_STREAM = 0x5917  # separates the split permutation's random stream from other uses of seed


class WriteConflict(ValueError):
    """The destination holds a partial write made with other parameters."""


def split_indices(num_samples: int, num_val: int, seed: int) -> dict[str, np.ndarray]:
    """Source indices of each split, in the order they are written (shuffled from ``seed``)."""
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(num_samples)
    splits = {TRAIN_SPLIT: order[num_val:]}
    if num_val:
        splits[VALIDATION_SPLIT] = order[:num_val]
    return splits


def shard_bytes(source: Source, indices: Sequence[int]) -> bytes:
    """One webdataset tar shard holding ``indices`` of ``source`` as ``key.jpg`` + ``key.cls``."""
    buffer = io.BytesIO()
    # Fixed mtime and owner: the tar bytes then depend only on the samples.
    with wds.TarWriter(buffer, user="", group="", mode=0o444, mtime=0, encoder=False) as tar:
        for index in indices:
            jpeg, label = source.sample(int(index))
            tar.write({"__key__": f"{int(index):09d}", "jpg": jpeg, "cls": str(label).encode()})
    return buffer.getvalue()


def _validation_count(num_samples: int, val_samples: int | None, val_fraction: float) -> int:
    count = val_samples if val_samples is not None else int(round(num_samples * val_fraction))
    if not 0 <= count < num_samples:
        raise ValueError(
            f"validation size {count} must be in 0..{num_samples - 1} (the source has "
            f"{num_samples} samples and the train split needs at least one)"
        )
    return count


def _check_plan(dest_url: str, plan: dict, storage_options: dict | None) -> None:
    """Record the write's parameters, or refuse to resume a write made with other ones."""
    plan_url = join_url(dest_url, PLAN_NAME)
    encoded = json.dumps(plan, indent=1, sort_keys=True).encode()
    try:
        existing = read_bytes(plan_url, storage_options)
    except StorageError:
        existing = None
    if existing is None:
        atomic_write_bytes(plan_url, encoded, storage_options)
    elif json.loads(existing) != plan:
        raise WriteConflict(
            f"{dest_url} holds shards written with other parameters ({existing.decode()}); "
            "write to an empty destination or delete it first"
        )


def _existing_names(dest_url: str, storage_options: dict | None) -> set[str]:
    """Names already at ``dest_url``; leftovers of a killed atomic write are deleted."""
    present = set()
    for url in list_urls(dest_url, storage_options):
        name = url.rsplit("/", 1)[-1]
        if is_temporary_name(name):
            remove_url(url, storage_options)  # never a shard, only a part of one
        else:
            present.add(name)
    return present


def write_shards(
    source: Source,
    dest_url: str,
    *,
    samples_per_shard: int = 1000,
    val_samples: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    storage_options: dict | None = None,
    progress: bool = True,
) -> DatasetInfo:
    """Write ``source`` as train/validation shards to ``dest_url``; skip shards already there."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    dest_url = dest_url.rstrip("/")
    num_val = _validation_count(len(source), val_samples, val_fraction)
    plan = {
        "source": source.describe(),
        "seed": seed,
        "samples_per_shard": samples_per_shard,
        "val_samples": num_val,
    }
    _check_plan(dest_url, plan, storage_options)
    present = _existing_names(dest_url, storage_options)
    splits = {}
    with tqdm(
        total=len(source),
        unit="img",
        desc=f"write {dest_url}",
        disable=not progress,
        file=sys.stderr,
    ) as bar:
        for split, indices in split_indices(len(source), num_val, seed).items():
            urls, lengths = [], []
            for shard, start in enumerate(range(0, len(indices), samples_per_shard)):
                chunk = indices[start : start + samples_per_shard]
                filename = f"{source.name}-{split}-{shard:06d}.tar"
                url = join_url(dest_url, filename)
                if filename not in present:
                    atomic_write_bytes(url, shard_bytes(source, chunk), storage_options)
                urls.append(url)
                lengths.append(len(chunk))
                bar.update(len(chunk))
            splits[split] = SplitInfo(split, tuple(urls), tuple(lengths))
    info = DatasetInfo(
        url=dest_url,
        name=source.name,
        num_classes=len(source.class_names),
        class_names=tuple(source.class_names),
        splits=splits,
        writer=plan,
    )
    atomic_write_bytes(join_url(dest_url, INFO_NAME), info_to_json(info), storage_options)
    return info
