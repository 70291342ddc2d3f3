"""Streaming loaders over webdataset shards: resumable seeded training stream, exact-once eval.

Training. Shard order: pass ``p`` over the split is a permutation drawn from (seed, epoch, p), the
same on every rank; the passes are concatenated and stream ``i`` of ``n`` = world_size x workers
takes every ``n``-th entry, so streams read disjoint shards within a pass and the stream never
ends. Samples go through a shuffle buffer seeded by (seed, epoch, rank, stream); each sample's
augmentation is seeded by (seed, epoch, rank, stream, position). Images stay uint8 until a batch
is complete, which is normalised in one vectorised step straight into shared memory.

Batch ``g`` of a rank comes from stream ``g mod workers``; with ``start_batch = j`` the physical
worker ``w`` serves stream ``(w + j) mod workers``, so the DataLoader's round-robin hands out
batches j, j+1, ... in order, and each stream skips its first batches by checking (not decoding
in full, not augmenting) the samples they would hold. Hence ``start_batch = j`` yields exactly
the tensors an uninterrupted stream yields from batch ``j`` on.

Skip counts: ``loader.skipped()`` (and ``loader.skipped_by_reason()``) read per-reason counters
kept in shared memory (``multiprocessing.Array``) that every worker adds to; they grow as the
loader is iterated. A sample counts as usable when its label parses and ``check_image`` passes,
in the skipped batches too, so a resumed stream drops the same samples as the original.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.decode import CorruptImage, check_image, decode_rgb, image_bytes
from pipeline.data.info import read_info
from pipeline.data.shardio import SkipCounter, iter_shard
from pipeline.data.transforms import (
    CROP_AREA,
    FusedTrainTransform,
    eval_transform,
    normalize_batch,
)

# Distinct streams of randomness derived from the same user seed.
_SHARD_ORDER, _SHUFFLE, _AUGMENT = 0x5A4D, 0x5B5F, 0x5C6E
TRAIN_SPLIT, EVAL_SPLIT = "train", "validation"
BLANK_RGB = (124, 116, 104)  # ImageNet mean colour: normalises to ~0


def shard_sequence(
    num_shards: int, seed: int, epoch: int, stream: int, num_streams: int
) -> Iterator[int]:
    """Endless shard indices of ``stream``: every ``num_streams``-th entry of seeded passes."""
    position, cached_pass, order = stream, -1, None
    while True:
        shard_pass, offset = divmod(position, num_shards)
        if shard_pass != cached_pass:
            rng = np.random.default_rng([seed, epoch, shard_pass, _SHARD_ORDER])
            order, cached_pass = rng.permutation(num_shards), shard_pass
        yield int(order[offset])
        position += num_streams


def shuffled(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """``items`` through a shuffle buffer of ``size`` (0 or 1: unchanged)."""
    if size <= 1:
        yield from items
        return
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = int(rng.integers(size))
        buffer[slot], item = item, buffer[slot]
        yield item
    for slot in rng.permutation(len(buffer)):
        yield buffer[slot]


def _labelled(samples: Iterator[dict], num_classes: int, counter: SkipCounter) -> Iterator:
    """(image bytes, label) of the samples that have both; the others are counted."""
    for sample in samples:
        data = image_bytes(sample)
        if data is None:
            counter.add("missing_image")
            continue
        try:
            label = int(sample["cls"].decode().strip())
        except (KeyError, ValueError, UnicodeDecodeError):
            label = -1
        if not 0 <= label < num_classes:
            counter.add("missing_label")
            continue
        yield data, label


def _decode(data: bytes, counter: SkipCounter) -> torch.Tensor | None:
    """RGB uint8 tensor of a sample that passes ``check_image``; None (counted) if it fails."""
    try:
        check_image(data)
    except CorruptImage:
        counter.add("corrupt_image")
        return None
    try:
        return decode_rgb(data)
    except CorruptImage:
        # Passed the check, failed the decode (rare: broken scan data). Dropping it would shift
        # every later batch of a resumed stream, so it is kept as a blank (mean-grey) image.
        counter.add("blank_substitute")
        return torch.tensor(BLANK_RGB, dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 8).clone()


_MASK64 = (1 << 64) - 1


def _mix64(value: int) -> int:
    """SplitMix64's finaliser: a bijection of 64-bit integers with good avalanche."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def _sample_seed(*parts: int) -> int:
    """A 63-bit seed from (seed, epoch, rank, stream, position); ~1 us, SeedSequence ~10 us."""
    state = _AUGMENT
    for part in parts:
        state = _mix64(state ^ _mix64(part))
    return state >> 1


def _shared_float_like(images: torch.Tensor) -> torch.Tensor:
    """An uninitialised float32 tensor of ``images``' shape in shared memory."""
    template = torch.empty(0, dtype=torch.float32)
    try:
        # What default_collate does in a worker: allocate the batch in shared memory at once,
        # so that sending it to the main process moves no bytes.
        storage = template._typed_storage()._new_shared(images.numel(), device="cpu")
        return template.new(storage).view(images.shape)
    except AttributeError:  # pragma: no cover - private API gone in a later torch
        return torch.empty(images.shape, dtype=torch.float32).share_memory_()


def _seeded(transform: Callable, image: torch.Tensor, seed: int) -> torch.Tensor:
    """``transform(image)`` with torch's global CPU generator seeded, then restored."""
    # torchvision's transforms draw from the global generator; restoring it keeps the trainer's
    # stream untouched when num_workers=0. Not torch.manual_seed: it also queues a lazy CUDA
    # seeding call with a formatted stack on every call (slow, and the queue grows).
    state = torch.get_rng_state()
    try:
        torch.default_generator.manual_seed(seed)
        return transform(image)
    finally:
        torch.set_rng_state(state)


def _batch(images: list[torch.Tensor], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack uint8 images and normalise them once for the whole batch."""
    stacked = torch.stack(images)
    out = _shared_float_like(stacked) if get_worker_info() is not None else None
    return normalize_batch(stacked, out=out), torch.tensor(labels, dtype=torch.int64)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class TrainStream(IterableDataset):
    """The rank's training batches for one epoch (see the module docstring)."""

    def __init__(
        self,
        shard_urls,
        num_classes,
        *,
        num_samples,
        batch_size,
        batches_per_epoch,
        rank,
        world_size,
        epoch,
        seed,
        transform,
        shuffle_buffer,
        start_batch,
        counter,
        storage_options=None,
        allow_pipe=False,
    ) -> None:
        self.shard_urls, self.num_classes = list(shard_urls), num_classes
        self.num_samples = num_samples
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.rank, self.world_size, self.epoch, self.seed = rank, world_size, epoch, seed
        self.transform, self.shuffle_buffer, self.start_batch = (
            transform,
            shuffle_buffer,
            start_batch,
        )
        self.counter, self.storage_options, self.allow_pipe = counter, storage_options, allow_pipe

    def _raw_samples(self, shards: Iterator[int], patience: int) -> Iterator[dict]:
        """The samples of the shards in order; an error after ``patience`` empty shards in a row."""
        empty = 0
        for shard in shards:
            found = False
            for sample in iter_shard(
                self.shard_urls[shard], self.counter, self.storage_options, self.allow_pipe
            ):
                found = True
                yield sample
            empty = 0 if found else empty + 1
            if empty > patience:
                raise RuntimeError(
                    f"{self.shard_urls[shard]}: no shard of the split holds a sample"
                )

    def _samples(self, stream: int, num_workers: int) -> Iterator[tuple[bytes, int]]:
        index = self.rank * num_workers + stream
        shards = shard_sequence(
            len(self.shard_urls), self.seed, self.epoch, index, self.world_size * num_workers
        )
        raw = self._raw_samples(shards, 2 * len(self.shard_urls) + self.world_size * num_workers)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, stream, _SHUFFLE])
        return shuffled(_labelled(raw, self.num_classes, self.counter), self.shuffle_buffer, rng)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker, num_workers = _worker()
        stream = (worker + self.start_batch) % num_workers
        first = self.start_batch + worker  # the first global batch index this worker serves
        remaining = max(0, -(-(self.batches_per_epoch - first) // num_workers))
        to_skip = ((first - stream) // num_workers) * self.batch_size  # usable samples
        images, labels, produced = [], [], 0
        if remaining == 0:
            return
        patience, last_usable = 2 * self.num_samples + self.shuffle_buffer + 100, 0
        for position, (data, label) in enumerate(self._samples(stream, num_workers)):
            if position - last_usable > patience:
                raise RuntimeError(
                    f"{self.shard_urls[0]} (and the other shards of the split): no usable sample "
                    f"in the last {patience} read ({self.counter.by_reason()})"
                )
            if to_skip:
                try:
                    check_image(data)
                    to_skip, last_usable = to_skip - 1, position
                except CorruptImage:
                    self.counter.add("corrupt_image")
                continue
            image = _decode(data, self.counter)
            if image is None:
                continue
            last_usable = position
            seed = _sample_seed(self.seed, self.epoch, self.rank, stream, position)
            images.append(_seeded(self.transform, image, seed))
            labels.append(label)
            if len(images) == self.batch_size:
                yield _batch(images, labels)
                images, labels, produced = [], [], produced + 1
                if produced == remaining:
                    return


class EvalStream(IterableDataset):
    """Every sample of the split once across ranks x workers: contiguous, balanced ranges."""

    def __init__(
        self,
        shard_urls,
        shard_lengths,
        num_classes,
        *,
        batch_size,
        rank,
        world_size,
        transform,
        counter,
        storage_options=None,
        allow_pipe=False,
    ) -> None:
        self.shard_urls, self.shard_lengths = list(shard_urls), list(shard_lengths)
        self.num_classes, self.batch_size = num_classes, batch_size
        self.rank, self.world_size, self.transform = rank, world_size, transform
        self.counter, self.storage_options, self.allow_pipe = counter, storage_options, allow_pipe

    def sample_range(self, worker: int, num_workers: int) -> tuple[int, int]:
        """[start, stop) of the split's sample indices that ``worker`` of this rank reads."""
        total = sum(self.shard_lengths)
        low, high = total * self.rank // self.world_size, total * (self.rank + 1) // self.world_size
        span = high - low
        return low + span * worker // num_workers, low + span * (worker + 1) // num_workers

    def _samples(self, start: int, stop: int) -> Iterator[dict]:
        offset = 0
        for url, length in zip(self.shard_urls, self.shard_lengths, strict=True):
            if offset < stop and offset + length > start:
                for position, sample in enumerate(
                    iter_shard(url, self.counter, self.storage_options, self.allow_pipe)
                ):
                    # Samples beyond the recorded length belong to no range: ignored.
                    if position < length and start <= offset + position < stop:
                        yield sample
            offset += length

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start, stop = self.sample_range(*_worker())
        images, labels = [], []
        for data, label in _labelled(self._samples(start, stop), self.num_classes, self.counter):
            image = _decode(data, self.counter)
            if image is None:
                continue
            images.append(self.transform(image))
            labels.append(label)
            if len(images) == self.batch_size:
                yield _batch(images, labels)
                images, labels = [], []
        if images:
            yield _batch(images, labels)


class ShardLoader:
    """An iterable of (images, labels) batches with the skip counts of its workers."""

    def __init__(
        self,
        dataset: IterableDataset,
        counter: SkipCounter,
        num_workers: int,
        pin_memory: bool,
        num_batches: int | None,
    ) -> None:
        self.dataset, self.counter, self.num_batches = dataset, counter, num_batches
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

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self._loader)

    def skipped(self) -> int:
        """Samples skipped so far by all workers (corrupt image, missing image/label, cut)."""
        return self.counter.skipped_samples()

    def skipped_by_reason(self) -> dict[str, int]:
        """Skip counts so far per reason (see ``pipeline.data.shardio.SKIP_REASONS``)."""
        return self.counter.by_reason()


class TrainLoader(ShardLoader):
    """A ShardLoader whose length is known: exactly ``batches_per_epoch - start_batch``."""

    def __len__(self) -> int:
        return self.num_batches


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


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
    shuffle_buffer: int = 1000,
    start_batch: int = 0,
    storage_options: dict | None = None,
    pin_memory: bool = False,
    allow_pipe: bool = False,
    transform: Callable | None = None,
    crop_min_area: float = CROP_AREA[0],
) -> TrainLoader:
    """Exactly ``batches_per_epoch - start_batch`` training batches of this rank for ``epoch``.

    ``url`` is a shard set written by ``write_shards`` (any fsspec URL; ``storage_options`` go
    to the filesystem). With ``allow_pipe=True`` it may be a ``pipe:`` command template in which
    ``{path}`` stands for a file name, e.g. ``pipe:aws s3 cp s3://b/set/{path} -``. ``transform``
    replaces the recipe (uint8 (3, H, W) in, uint8 (3, R, R) out). Batches are float32 NCHW
    normalised with the ImageNet mean/std, labels int64; ``loader.skipped()`` counts bad samples.
    """
    _check_positive(
        batch_size=batch_size,
        batches_per_epoch=batches_per_epoch,
        world_size=world_size,
        resolution=resolution,
    )
    if not 0 <= rank < world_size or not 0 <= start_batch <= batches_per_epoch:
        raise ValueError(
            f"need 0 <= rank < world_size and 0 <= start_batch <= batches_per_epoch "
            f"(got rank={rank}, world_size={world_size}, start_batch={start_batch})"
        )
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    info = read_info(url, storage_options, allow_pipe=allow_pipe)
    split = info.split(TRAIN_SPLIT)
    counter = SkipCounter()
    dataset = TrainStream(
        split.shard_urls,
        info.num_classes,
        num_samples=split.num_samples,
        batch_size=batch_size,
        batches_per_epoch=batches_per_epoch,
        rank=rank,
        world_size=world_size,
        epoch=epoch,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        start_batch=start_batch,
        counter=counter,
        transform=transform
        or FusedTrainTransform(
            resolution, randaugment_layers, randaugment_magnitude, crop_min_area
        ),
        storage_options=storage_options,
        allow_pipe=allow_pipe,
    )
    return TrainLoader(dataset, counter, num_workers, pin_memory, batches_per_epoch - start_batch)


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
    split: str = EVAL_SPLIT,
) -> ShardLoader:
    """Every sample of ``split`` exactly once across ranks x workers (last batches may be short).

    Each rank reads a contiguous range of the split's samples (sizes differ by at most one) and
    its workers split that range again; arguments as in ``make_train_loader``.
    """
    _check_positive(batch_size=batch_size, world_size=world_size, resolution=resolution)
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    info = read_info(url, storage_options, allow_pipe=allow_pipe)
    chosen = info.split(split)
    counter = SkipCounter()
    dataset = EvalStream(
        chosen.shard_urls,
        chosen.shard_lengths,
        info.num_classes,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        transform=eval_transform(resolution, normalize=False),
        counter=counter,
        storage_options=storage_options,
        allow_pipe=allow_pipe,
    )
    return ShardLoader(dataset, counter, num_workers, pin_memory, None)
