"""Streaming loaders over webdataset shards: resumable seeded training stream, exact-once eval.

``make_train_loader`` and ``make_eval_loader`` check their arguments, read the shard set's
``_info.json`` and wrap the streams of ``pipeline.data.streams`` (the determinism and resume
contract is described there) in a DataLoader. A training loader runs at most as many processes as
its rank owns canonical streams, and a number that divides them, so that each stream belongs to
one process. ``loader.skipped()`` reads the skip counts that every loader worker adds to in
shared memory; they grow as the loader is iterated.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from pipeline.data.info import TRAIN_SPLIT, VALIDATION_SPLIT, read_info
from pipeline.data.mixing import TrainRecipe
from pipeline.data.streams import EvalStream, Layout, Shards, TrainStream
from pipeline.data.transforms import CROP_AREA, EVAL_PADDING, InceptionCrop, eval_transform

log = logging.getLogger(__name__)


class ShardLoader:
    """An iterable of batches with the skip counts of its workers: (images, labels) for
    evaluation, (images, MixTargets) for training."""

    def __init__(
        self,
        dataset: TrainStream | EvalStream,
        num_workers: int,
        pin_memory: bool,
        num_batches: int | None,
    ) -> None:
        self.dataset, self.num_batches = dataset, num_batches
        self.counter = dataset.shards.counter
        self._loader = DataLoader(
            dataset,
            batch_size=None,  # the streams batch themselves (uint8 until the batch exists)
            num_workers=num_workers,
            pin_memory=pin_memory,
            prefetch_factor=4 if num_workers else None,
            # Its workers' base seed would otherwise be drawn from the trainer's global
            # generator; the streams seed themselves, so a private generator suffices.
            generator=torch.Generator().manual_seed(0),
        )

    def __iter__(self) -> Iterator[tuple]:
        return iter(self._loader)

    def skipped(self) -> int:
        """Samples skipped so far by all workers (corrupt image, missing image/label, cut)."""
        return self.counter.skipped_samples()


class TrainLoader(ShardLoader):
    """A ShardLoader whose length is known: exactly ``batches_per_epoch - start_batch``."""

    def __len__(self) -> int:
        return self.num_batches


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _shards(
    url: str,
    split: str,
    storage_options: dict | None,
    allow_pipe: bool,
    prefetch_shards: int = 0,
    **hints: int | None,
) -> Shards:
    """The shards of ``split`` of the shard set at ``url``, with a fresh skip counter.

    ``hints`` (``num_samples``, ``num_classes``) describe a brace pattern of shards that no
    ``_info.json`` lists (see ``pipeline.data.info.pattern_info``).
    """
    info = read_info(url, storage_options, allow_pipe=allow_pipe, **hints)
    chosen = info.split(split)
    return Shards(
        chosen.shard_urls,
        chosen.shard_lengths,
        info.num_classes,
        storage_options,
        allow_pipe,
        prefetch_shards,
    )


def make_train_loader(
    url: str,
    *,
    batch_size: int,
    batches_per_epoch: int,
    rank: int,
    world_size: int,
    epoch: int,
    seed: int,
    num_workers: int,
    resolution: int,
    randaugment_layers: int,
    randaugment_magnitude: float,
    mixup_alpha: float = 0.0,
    cutmix: bool = False,
    augment_before_mix: bool = False,
    shuffle_buffer: int = 1000,
    start_batch: int = 0,
    accumulation: int = 1,
    streams: int | None = None,
    storage_options: dict | None = None,
    pin_memory: bool = False,
    allow_pipe: bool = False,
    crop_min_area: float = CROP_AREA[0],
    prefetch_shards: int = 0,
    num_samples: int | None = None,
    num_classes: int | None = None,
) -> TrainLoader:
    """Exactly ``batches_per_epoch - start_batch`` training batches of this rank for ``epoch``.

    Batch ``i`` of the rank is slot ``i mod accumulation`` of step ``i div accumulation``: global
    micro-batch ``slot x world_size + rank`` of the step, made by one of the run's ``streams``
    canonical streams (a multiple of ``world_size x accumulation``; None: that product). Its
    tensors depend on neither ``world_size`` nor ``num_workers`` (``pipeline.data.streams``).

    ``url`` is a shard set written by ``write_shards`` (any fsspec URL; ``storage_options`` go
    to the filesystem). With ``allow_pipe=True`` it may be a ``pipe:`` command template in which
    ``{path}`` stands for a file name, e.g. ``pipe:aws s3 cp s3://b/set/{path} -``. Each image is
    Inception-cropped and flipped, then the batch goes through ``TrainRecipe`` (MixUp/CutMix and
    DM's RandAugment; with ``mixup_alpha > 0`` or ``cutmix`` and not ``augment_before_mix``, DM's
    order: each output reads two images). Batches are ``(images, MixTargets)``: float32 NCHW
    normalised with the ImageNet mean/std, and what the loss needs to mix the labels;
    ``loader.skipped()`` counts bad samples. ``prefetch_shards`` shards are fetched ahead of the
    one being decoded; ``num_samples`` and ``num_classes`` describe a brace pattern of shards that
    no ``_info.json`` lists.
    """
    _check_positive(
        batch_size=batch_size,
        batches_per_epoch=batches_per_epoch,
        world_size=world_size,
        resolution=resolution,
        accumulation=accumulation,
        streams=streams or 1,
    )
    if not 0 <= rank < world_size or not 0 <= start_batch <= batches_per_epoch:
        raise ValueError(
            f"need 0 <= rank < world_size and 0 <= start_batch <= batches_per_epoch "
            f"(got rank={rank}, world_size={world_size}, start_batch={start_batch})"
        )
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    layout = Layout(rank, world_size, accumulation, streams)
    processes = layout.loader_processes(num_workers)
    if processes != num_workers:
        log.info(
            f"rank {rank}: {processes} loader processes instead of {num_workers}: they share "
            f"the rank's {layout.num_streams // world_size} canonical streams"
        )
    recipe = TrainRecipe(
        randaugment_layers,
        randaugment_magnitude,
        mixup_alpha=mixup_alpha,
        cutmix=cutmix,
        augment_before_mix=augment_before_mix,
    )
    dataset = TrainStream(
        _shards(
            url,
            TRAIN_SPLIT,
            storage_options,
            allow_pipe,
            prefetch_shards,
            num_samples=num_samples,
            num_classes=num_classes,
        ),
        batch_size=batch_size,
        batches_per_epoch=batches_per_epoch,
        start_batch=start_batch,
        layout=layout,
        epoch=epoch,
        seed=seed,
        transform=InceptionCrop(resolution, crop_min_area),
        recipe=recipe,
        shuffle_buffer=shuffle_buffer,
    )
    return TrainLoader(dataset, processes, pin_memory, batches_per_epoch - start_batch)


def make_eval_loader(
    url: str,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    resolution: int,
    storage_options: dict | None = None,
    pin_memory: bool = False,
    allow_pipe: bool = False,
    split: str = VALIDATION_SPLIT,
    prefetch_shards: int = 0,
    eval_padding: int = EVAL_PADDING,
) -> ShardLoader:
    """Every sample of ``split`` exactly once across ranks x workers (last batches may be short).

    Each rank reads a contiguous range of the split's samples (sizes differ by at most one) and
    its workers split that range again; arguments as in ``make_train_loader``.
    """
    _check_positive(batch_size=batch_size, world_size=world_size, resolution=resolution)
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    dataset = EvalStream(
        _shards(url, split, storage_options, allow_pipe, prefetch_shards),
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        transform=eval_transform(resolution, eval_padding),
    )
    return ShardLoader(dataset, num_workers, pin_memory, None)
